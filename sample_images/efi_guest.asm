; ---------------------------------------------------------------------------
; v2p EFI test guest: a tiny UEFI application (NASM, flat binary that IS a
; PE32+ image; no linker, no toolchain beyond nasm).
;
; build.py places it as \EFI\BOOT\BOOTX64.EFI on the FAT ESP of a GPT disk,
; the removable-media path UEFI firmware boots without any boot entry.
;
; Output on COM1 only (0x3F8; the firmware has already set the UART up for its
; own serial console), one line ending in CR LF:
;   v2p-efi-guest: up
; then RuntimeServices->ResetSystem(EfiResetShutdown), which makes QEMU exit;
; if that returns: cli/hlt forever.
;
; Why COM1 and not ConOut->OutputString: OVMF's terminal driver wraps text in
; escape sequences and may echo it to several consoles; the direct write gives
; exactly one clean line, as the BIOS guest does.
;
; Image layout: headers in the first 200h bytes of the file, one RWX section
; (.text, code and data) at file offset 200h / RVA 1000h.  The code is
; position-independent (RIP-relative only) and the image carries no base
; relocations; RELOCS_STRIPPED is NOT set, so the loader may place it anywhere
; (with the flag set, EDK2 would insist on ImageBase).
;
; Assemble: nasm -f bin -o BOOTX64.EFI efi_guest.asm
; ---------------------------------------------------------------------------

bits 64
default rel

COM1            equ 0x3F8
SECTION_ALIGN   equ 0x1000
FILE_ALIGN      equ 0x200
TEXT_RVA        equ 0x1000

; EFI table offsets (UEFI 2.x, x86-64)
ST_RUNTIME      equ 0x58            ; EFI_SYSTEM_TABLE.RuntimeServices
RT_RESET        equ 0x68            ; EFI_RUNTIME_SERVICES.ResetSystem
RESET_SHUTDOWN  equ 2               ; EfiResetShutdown

section .headers start=0 vstart=0
dos_header:
        db      "MZ"
        times   0x3C - ($ - $$) db 0
        dd      pe_header           ; e_lfanew
pe_header:
        db      "PE", 0, 0
        dw      0x8664              ; Machine: x86-64
        dw      1                   ; NumberOfSections
        dd      0                   ; TimeDateStamp: 0 keeps the build deterministic
        dd      0, 0                ; no COFF symbol table
        dw      optional_end - optional
        dw      0x0022              ; EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE
optional:
        dw      0x020B              ; PE32+
        db      0, 0                ; linker version
        dd      text_file_size      ; SizeOfCode
        dd      0, 0                ; SizeOfInitializedData, SizeOfUninitializedData
        dd      efi_main            ; AddressOfEntryPoint (RVA)
        dd      TEXT_RVA            ; BaseOfCode
        dq      0x10000000          ; ImageBase (a preference only: relocatable)
        dd      SECTION_ALIGN
        dd      FILE_ALIGN
        dw      0, 0, 0, 0, 0, 0    ; OS / image / subsystem versions
        dd      0                   ; Win32VersionValue
        dd      TEXT_RVA + SECTION_ALIGN    ; SizeOfImage
        dd      FILE_ALIGN          ; SizeOfHeaders
        dd      0                   ; CheckSum (not checked for EFI images)
        dw      10                  ; Subsystem: EFI application
        dw      0                   ; DllCharacteristics
        dq      0x10000, 0x10000    ; stack reserve / commit (unused by UEFI)
        dq      0, 0                ; heap reserve / commit
        dd      0                   ; LoaderFlags
        dd      16                  ; NumberOfRvaAndSizes
        times   16 dq 0             ; no exports, imports, relocations, debug...
optional_end:
section_table:
        db      ".text", 0, 0, 0
        dd      text_end - text_start   ; VirtualSize
        dd      TEXT_RVA            ; VirtualAddress
        dd      text_file_size      ; SizeOfRawData
        dd      FILE_ALIGN          ; PointerToRawData
        dd      0, 0                ; relocations, line numbers
        dw      0, 0
        dd      0xE0000020          ; CODE | EXECUTE | READ | WRITE
%if ($ - $$) > FILE_ALIGN
%error "PE headers do not fit in FILE_ALIGN bytes"
%endif
        times   FILE_ALIGN - ($ - $$) db 0

section .text start=FILE_ALIGN vstart=TEXT_RVA
text_start:

; efi_main(ImageHandle = RCX, SystemTable = RDX), Microsoft x64 ABI
efi_main:
        push    rbx
        sub     rsp, 0x20           ; shadow space; RSP is 16-aligned again
        mov     rbx, rdx
        lea     rsi, [msg_up]
        call    puts
        call    uart_drain

        mov     rax, [rbx + ST_RUNTIME]
        mov     ecx, RESET_SHUTDOWN
        xor     edx, edx            ; EFI_SUCCESS
        xor     r8d, r8d            ; no reset data
        xor     r9d, r9d
        call    [rax + RT_RESET]
.halt:                              ; ResetSystem does not return; if it did:
        cli
        hlt
        jmp     .halt

; puts: RSI = NUL-terminated string -> COM1
puts:
        lodsb
        test    al, al
        jz      .done
        mov     ah, al
        mov     ecx, 0x100000       ; bounded wait for THR empty
        mov     dx, COM1 + 5
.wait:
        in      al, dx
        test    al, 0x20
        jnz     .send
        loop    .wait
.send:
        mov     dx, COM1
        mov     al, ah
        out     dx, al
        jmp     puts
.done:
        ret

; uart_drain: wait (bounded) until the transmitter is empty, so the line is
; out before the machine goes away
uart_drain:
        mov     ecx, 0x100000
        mov     dx, COM1 + 5
.w:
        in      al, dx
        test    al, 0x40
        jnz     .ok
        loop    .w
.ok:
        ret

; The leading CR LF: OVMF leaves its own console output mid-line.
msg_up:         db 13, 10, "v2p-efi-guest: up", 13, 10, 0

text_end:
        times   (FILE_ALIGN - ($ - $$) % FILE_ALIGN) % FILE_ALIGN db 0
text_file_size  equ $ - $$
