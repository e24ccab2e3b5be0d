; ---------------------------------------------------------------------------
; v2p EFI test guest: a tiny UEFI application (NASM, flat binary that IS a
; PE32+ image; no linker, no toolchain beyond nasm).
;
; build.py places it as \EFI\BOOT\BOOTX64.EFI on the FAT ESP of a GPT disk,
; the removable-media path UEFI firmware boots without any boot entry.
;
; What it does, as an OS loader does before it hands over to its kernel:
;   1. reads its "kernel": KERNEL_BYTES (10 MiB) of the partition it was
;      loaded from, LoadedImage->DeviceHandle's EFI_BLOCK_IO_PROTOCOL (the
;      ESP; build.py makes it large enough), in 1 MiB ReadBlocks calls into
;      pages from AllocatePages; fewer if the partition ends sooner, and a
;      failing call ends the load quietly.  What is read is thrown away: the
;      point is the disk's read counters, all a hypervisor sees of an OS that
;      prints nothing (QEMU query-blockstats rd_bytes, PVE blockstat);
;   2. prints one line on COM1 (0x3F8; the firmware has already set the UART
;      up for its own serial console), ending in CR LF:
;        v2p-efi-guest: up
;   3. waits SHUTDOWN_US (2 s, gBS->Stall): an OS does not power off the
;      instant it has loaded, and a poll every 0.5 s must see the reads;
;   4. RuntimeServices->ResetSystem(EfiResetShutdown), which makes QEMU exit;
;      if that returns: cli/hlt forever.
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
ST_BOOT         equ 0x60            ; EFI_SYSTEM_TABLE.BootServices
RT_RESET        equ 0x68            ; EFI_RUNTIME_SERVICES.ResetSystem
RESET_SHUTDOWN  equ 2               ; EfiResetShutdown
BS_ALLOC_PAGES  equ 0x28            ; EFI_BOOT_SERVICES.AllocatePages
BS_HANDLE_PROTO equ 0x98            ; EFI_BOOT_SERVICES.HandleProtocol
BS_STALL        equ 0xF8            ; EFI_BOOT_SERVICES.Stall
ALLOC_ANY       equ 0               ; AllocateAnyPages
LOADER_DATA     equ 2               ; EfiLoaderData
LI_DEVICE       equ 0x18            ; EFI_LOADED_IMAGE_PROTOCOL.DeviceHandle
BIO_MEDIA       equ 0x08            ; EFI_BLOCK_IO_PROTOCOL.Media
BIO_READ        equ 0x18            ; EFI_BLOCK_IO_PROTOCOL.ReadBlocks
MEDIA_ID        equ 0x00            ; EFI_BLOCK_IO_MEDIA.MediaId (UINT32)
MEDIA_BSIZE     equ 0x0C            ; EFI_BLOCK_IO_MEDIA.BlockSize (UINT32)
MEDIA_LAST      equ 0x18            ; EFI_BLOCK_IO_MEDIA.LastBlock (UINT64)

KERNEL_BYTES    equ 10 * 1024 * 1024    ; what the guest reads of its partition
CHUNK_BYTES     equ 1024 * 1024     ; one ReadBlocks call
SHUTDOWN_US     equ 2000000         ; wait before the shutdown (gBS->Stall)

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
        push    r12
        push    r13
        push    r14
        push    r15
        sub     rsp, 0x30           ; shadow space + a 5th argument; 16-aligned
        mov     rbx, rdx
        mov     r12, rcx            ; ImageHandle
        call    load_kernel
        lea     rsi, [msg_up]
        call    puts
        call    uart_drain

        mov     rax, [rbx + ST_BOOT]
        mov     ecx, SHUTDOWN_US
        call    [rax + BS_STALL]

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

; load_kernel: see the header (1.).  RBX = SystemTable, R12 = ImageHandle;
; uses R13 (BlockIo), R14 (next LBA), R15 (blocks left), RSI (buffer).
load_kernel:
        push    rsi
        sub     rsp, 0x30           ; shadow space + a 5th argument; 16-aligned
        mov     rax, [rbx + ST_BOOT]
        mov     rcx, r12
        lea     rdx, [guid_loaded_image]
        lea     r8, [iface]
        call    [rax + BS_HANDLE_PROTO]
        test    rax, rax
        jnz     .done
        mov     rcx, [iface]
        mov     rcx, [rcx + LI_DEVICE]
        mov     rax, [rbx + ST_BOOT]
        lea     rdx, [guid_block_io]
        lea     r8, [iface]
        call    [rax + BS_HANDLE_PROTO]
        test    rax, rax
        jnz     .done
        mov     r13, [iface]
        mov     rax, [rbx + ST_BOOT]
        mov     ecx, ALLOC_ANY
        mov     edx, LOADER_DATA
        mov     r8d, CHUNK_BYTES / 4096
        lea     r9, [buffer]
        call    [rax + BS_ALLOC_PAGES]  ; page-aligned: meets any IoAlign
        test    rax, rax
        jnz     .done
        mov     rax, [r13 + BIO_MEDIA]
        mov     ecx, [rax + MEDIA_BSIZE]
        test    ecx, ecx
        jz      .done
        cmp     ecx, CHUNK_BYTES
        ja      .done
        mov     [block_size], rcx
        mov     eax, KERNEL_BYTES
        xor     edx, edx
        div     rcx
        mov     r15, rax            ; blocks to read
        mov     rax, [r13 + BIO_MEDIA]
        mov     rax, [rax + MEDIA_LAST]
        inc     rax                 ; blocks on the partition
        cmp     rax, r15
        jae     .sized
        mov     r15, rax
.sized:
        mov     eax, CHUNK_BYTES
        xor     edx, edx
        div     qword [block_size]
        mov     [chunk_blocks], rax
        xor     r14d, r14d
.next:
        test    r15, r15
        jz      .done
        mov     rax, [chunk_blocks]
        cmp     rax, r15
        jbe     .call
        mov     rax, r15
.call:
        mov     [this_blocks], rax
        mul     qword [block_size]
        mov     r9, rax             ; BufferSize
        mov     rax, [buffer]
        mov     [rsp + 0x20], rax   ; 5th argument: Buffer
        mov     rcx, r13
        mov     rax, [r13 + BIO_MEDIA]
        mov     edx, [rax + MEDIA_ID]
        mov     r8, r14             ; Lba
        call    [r13 + BIO_READ]
        test    rax, rax
        jnz     .done
        mov     rax, [this_blocks]
        add     r14, rax
        sub     r15, rax
        jmp     .next
.done:
        add     rsp, 0x30
        pop     rsi
        ret

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

guid_loaded_image:                  ; 5B1B31A1-9562-11D2-8E3F-00A0C969723B
        dd      0x5B1B31A1
        dw      0x9562, 0x11D2
        db      0x8E, 0x3F, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B
guid_block_io:                      ; 964E5B21-6459-11D2-8E39-00A0C969723B
        dd      0x964E5B21
        dw      0x6459, 0x11D2
        db      0x8E, 0x39, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B
        align   8, db 0
iface:          dq 0
buffer:         dq 0
block_size:     dq 0
chunk_blocks:   dq 0
this_blocks:    dq 0

text_end:
        times   (FILE_ALIGN - ($ - $$) % FILE_ALIGN) % FILE_ALIGN db 0
text_file_size  equ $ - $$
