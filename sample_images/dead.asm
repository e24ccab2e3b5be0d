; ---------------------------------------------------------------------------
; Dead-case boot sectors: one 512-byte MBR each, for the boot check's failure
; cases (build.py writes them to OUTDIR/dead/<name>.raw).  Each stands in for
; a way a real migrated disk fails to boot, and does what the real thing does
; on the signals a hypervisor sees (disk reads, resets, serial text, screen,
; pvpanic), nothing project-specific.  Pick one with a define:
;
;   -DDEAD_HALT       cli; hlt forever: a boot loader stuck with interrupts
;                     off.  Reads nothing beyond the MBR the BIOS loaded.
;   -DDEAD_RESETLOOP  a triple fault: LIDT with limit 0, then INT 3.  In real
;                     mode the CPU checks the vector against the IDT limit
;                     (QEMU target/i386/tcg/seg_helper.c do_interrupt_real
;                     raises #GP, which fails the same way -> double fault
;                     -> triple fault -> cpu reset), so the machine resets,
;                     the firmware boots this sector again, forever: what a
;                     Windows that bugchecks at boot with auto-restart does.
;   -DDEAD_GRUBRESCUE GRUB 2's rescue prompt when the partition of its prefix
;                     is gone, in GRUB's own words (grub-core/kern/main.c
;                     grub_set_prefix_and_root -> grub_print_error "error: %s.",
;                     grub-core/kern/rescue_reader.c grub_rescue_run "Entering
;                     rescue mode..." and the prompt "grub rescue> "), on COM1
;                     AND on the screen through INT 10h AH=0Eh (GRUB's i386-pc
;                     console is the screen), then idles with sti/hlt waiting
;                     for a key, as the prompt does.
;   -DDEAD_PANIC      Linux's panic when it cannot mount its root file system
;                     (init/do_mounts.c mount_block_root, kernel/panic.c panic:
;                     "Kernel panic - not syncing: ..." and the "---[ end
;                     Kernel panic" trailer) on COM1, then writes
;                     PVPANIC_PANICKED (1, include/uapi/misc/pvpanic.h) to
;                     the pvpanic I/O port 0x505 as drivers/misc/pvpanic does
;                     (QEMU hw/misc/pvpanic-isa.c, default ioport 0x505 ->
;                     GUEST_PANICKED event), and halts.
;
; (No boot code at all is zeros.raw: build.py writes no boot sector.)
;
; Assemble: nasm -f bin -DDEAD_HALT -o halt.bin dead.asm
; ---------------------------------------------------------------------------

%ifdef DEAD_GRUBRESCUE
%define DEAD_TEXT
%endif
%ifdef DEAD_PANIC
%define DEAD_TEXT
%endif

bits 16
org 0x7C00

COM1            equ 0x3F8
PVPANIC_PORT    equ 0x505
PVPANIC_PANICKED equ 1

start:
        cli
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     sp, 0x7C00
        cld
        jmp     0:.norm
.norm:

%ifdef DEAD_HALT
.stuck:
        cli
        hlt
        jmp     .stuck

%elifdef DEAD_RESETLOOP
        lidt    [null_idt]
        int     3                       ; #GP -> #DF -> triple fault -> reset
.stuck:                                 ; not reached
        cli
        hlt
        jmp     .stuck
null_idt:
        dw      0                       ; limit 0: no vector fits
        dd      0

%elifdef DEAD_GRUBRESCUE
        sti
        call    uart_init
        mov     si, msg_rescue
        call    serial_puts
        mov     si, msg_rescue
        call    screen_puts
.idle:                                  ; the prompt waits for a key
        hlt
        jmp     .idle

%elifdef DEAD_PANIC
        call    uart_init
        mov     si, msg_panic
        call    serial_puts
        mov     dx, PVPANIC_PORT
        mov     al, PVPANIC_PANICKED
        out     dx, al
.stuck:
        cli
        hlt
        jmp     .stuck

%else
%error "define one of DEAD_HALT, DEAD_RESETLOOP, DEAD_GRUBRESCUE, DEAD_PANIC"
%endif

%ifdef DEAD_TEXT
; uart_init: COM1 115200 8N1, FIFO on (the firmware may not have set it up)
uart_init:
        mov     dx, COM1 + 3
        mov     al, 0x80
        out     dx, al                  ; DLAB = 1
        mov     dx, COM1
        mov     ax, 1
        out     dx, ax                  ; divisor 1 (115200 baud), low + high byte
        mov     dx, COM1 + 3
        mov     al, 0x03
        out     dx, al                  ; 8N1, DLAB = 0
        mov     dx, COM1 + 1
        xor     al, al
        out     dx, al                  ; no UART interrupts
        mov     dx, COM1 + 2
        mov     al, 0xC7
        out     dx, al                  ; FIFO enable + clear
        mov     dx, COM1 + 4
        mov     al, 0x03
        out     dx, al                  ; DTR, RTS
        ret

; serial_puts: DS:SI = NUL-terminated string -> COM1 (bounded wait per byte)
serial_puts:
        lodsb
        test    al, al
        jz      .done
        mov     bl, al
        mov     cx, 0xFFFF
        mov     dx, COM1 + 5
.wait:
        in      al, dx
        test    al, 0x20
        jnz     .send
        loop    .wait
.send:
        mov     dx, COM1
        mov     al, bl
        out     dx, al
        jmp     serial_puts
.done:
        ret

%ifdef DEAD_GRUBRESCUE
; screen_puts: DS:SI = NUL-terminated string -> INT 10h teletype (LF is a
; line feed only there, so the text carries CR LF as GRUB's terminal sends)
screen_puts:
        lodsb
        test    al, al
        jz      .done
        mov     ah, 0x0E
        xor     bx, bx                  ; page 0
        int     0x10
        jmp     screen_puts
.done:
        ret

; The bare CR LF first ends the firmware's unterminated "Booting from Hard
; Disk..." line, as GRUB's own output starts on a fresh line of the screen.
msg_rescue:
        db      13, 10
        db      "error: no such partition.", 13, 10
        db      "Entering rescue mode...", 13, 10
        db      "grub rescue> ", 0
%endif

%ifdef DEAD_PANIC
msg_panic:
        db      13, 10
        db      "[    1.042133] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)", 13, 10
        db      "[    1.043054] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---", 13, 10, 0
%endif
%endif

%if ($ - $$) > 446
%error "boot code does not fit in front of the partition table"
%endif
                times 446 - ($ - $$) db 0
                times 64 db 0           ; empty partition table
                dw 0xAA55
