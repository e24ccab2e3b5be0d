; ---------------------------------------------------------------------------
; v2p test guest: a tiny real-mode boot program (NASM, flat binary).
;
; Layout on disk:
;   LBA 0      stage 1 (MBR): sets up segments/stack/UART, loads stage 2 from
;              LBA 1.. with INT 13h AH=42h (CHS AH=02h as fallback), jumps
;              to it.  Bytes 446..509 are an EMPTY partition table (all zero),
;              bytes 510..511 are 55 AA.
;   LBA 1..n   stage 2: the actual probe logic.
;
; Output on COM1 only (0x3F8, 115200 8N1; see putc for why there is no INT 10h
; mirror), every line ending in CR LF:
;   v2p-guest: boot controller=<NAME> pci=<vvvv>:<dddd>
;   v2p-guest: disk sectors=<decimal>
;   v2p-guest: last-sector marker=<TEXT>|<none>
;   v2p-guest: disk 0x<dd> sectors=<decimal> marker=<TEXT>|<none>
;       (one line per BIOS hard disk 80h.., see report_disks)
;   v2p-guest: poweroff
; then an ACPI S5 soft-off (PM1a_CNT = PMBASE+4, SLP_EN|SLP_TYP=0 = 0x2000),
; which makes QEMU exit; if that does not work: cli/hlt forever.
;
; Controller detection (see find_boot_controller):
;   1. INT 13h AH=48h (EDD) on the boot drive with a 0x4A-byte buffer.  If the
;      result carries valid EDD 3.0 device path information (key 0BEDDh at
;      1Eh, length 24h/2Ch at 20h, checksum over that block = 0) and the host
;      bus (24h) is "PCI", the interface path (30h) gives bus/device/function
;      of the controller; its vendor:device is read with PCI configuration
;      mechanism #1 (0xCF8/0xCFC).
;      SeaBIOS 1.16.2 (Debian 12 / QEMU 7.2) provides the path for IDE,
;      virtio-blk and virtio-scsi drives on i440fx and q35, but NOT for
;      lsi53c895a or q35 AHCI drives (only the 1Ah-byte EDD 1.x table comes
;      back there) -> fallback 2.
;   2. Fallback (no valid EDD path, host bus not PCI, or nothing at that
;      BDF): scan PCI bus 0 (every device; functions 1-7 only when function 0
;      is multi-function) for mass-storage devices (class code 01h) and keep
;      the first one found in each of three ranks:
;        A  add-on HBAs that are neither chipset built-ins nor virtio
;           (lsi 1000:0012, megasas, pvscsi, ...)
;        B  virtio controllers (vendor 1af4)
;        C  chipset built-ins: PIIX3 IDE 8086:7010 (always present on
;           i440fx) and ICH9 AHCI 8086:2922 at 00:1f.2 (always present on
;           q35); an ICH9 AHCI in another slot (added to i440fx) is rank A
;      and report A, else B, else C, else controller=unknown pci=ffff:ffff.
;      Why this order: the built-in controller is always there, so when any
;      other storage controller exists the boot disk almost certainly hangs
;      on that one.  Among add-ons, SeaBIOS always describes virtio drives
;      with an EDD path, so reaching the fallback means the boot drive is
;      most likely on a controller whose driver gives no path (rank A).
;      With one boot disk - the case the v2p tests use - every setup is
;      unambiguous: i440fx+lsi -> A, q35 AHCI (no path in SeaBIOS 1.16.2) ->
;      C; ide/virtio-blk/virtio-scsi are resolved by the EDD path already.
;   Name mapping: 8086:7010 ide, 8086:2922 sata, 1af4:1001/1af4:1042
;   virtio-blk, 1af4:1004/1af4:1048 virtio-scsi, 1000:0012 lsi, else unknown.
;
; Assemble: nasm -f bin -o guest.bin guest.asm
;   (-DDEBUG_EDD adds a "v2p-guest: debug ..." line with the raw EDD buffer
;   and the detection method; never used for the shipped images.)
;
; Windows stand-in variants (see standin.inc for what they do):
;   nasm -f bin -DWINDOWS_STANDIN   -o winguest.bin          guest.asm
;   nasm -f bin -DSTANDIN_NO_DRIVER -o winguest-nodriver.bin guest.asm
;   (-DSTANDIN_FLAG_LBA=<n> moves the driver flag sector, default 2048.)
;   They print the same first three lines, then behave like Windows about
;   virtio storage drivers instead of powering off.  Without these defines
;   the output of this file is byte-for-byte the plain guest.
; ---------------------------------------------------------------------------

%ifdef STANDIN_NO_DRIVER
%define WINDOWS_STANDIN
%endif

bits 16
org 0x7C00

COM1            equ 0x3F8
KERNEL_SEG      equ 0x2000          ; 64 KiB scratch at 0x20000 for the "kernel" reads
KERNEL_BYTES    equ 10 * 1024 * 1024    ; what load_kernel reads of the boot disk
SHUTDOWN_TICKS  equ 37              ; ~2 s of IRQ0 ticks (18.2 Hz) before power-off
STAGE2_ADDR     equ 0x7E00          ; right behind the MBR
EDD_BUF         equ 0x0600          ; 0x50 bytes, free low memory
DAP_BUF         equ 0x0580          ; 16-byte disk address packet
SEC_BUF         equ 0x1000          ; one sector (up to 4 KiB) for the last-LBA read
EDD_BUF_SIZE    equ 0x4A            ; EDD 3.0 (T13 layout) parameter table size

; ------------------------------- stage 1 -----------------------------------
stage1:
        cli
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     sp, 0x7C00
        sti
        cld
        jmp     0:.norm                 ; normalise CS:IP to 0000:7Cxx
.norm:
        mov     [boot_drive], dl
        call    uart_init

        ; load stage 2 with an extended read (LBA 1, STAGE2_SECTORS sectors)
        mov     si, stage2_dap
        mov     dl, [boot_drive]
        mov     ah, 0x42
        int     0x13
        jnc     .loaded

        ; fallback: plain CHS read of cylinder 0, head 0, sectors 2..
        xor     ax, ax
        mov     dl, [boot_drive]
        int     0x13                    ; reset
        mov     ax, 0x0200 | STAGE2_SECTORS
        mov     cx, 0x0002
        xor     dh, dh
        mov     dl, [boot_drive]
        mov     bx, STAGE2_ADDR
        int     0x13
        jnc     .loaded

        mov     si, msg_loadfail
        call    puts
        jmp     halt_forever
.loaded:
        jmp     stage2

; --- tiny I/O helpers (live in stage 1 so it can report a load failure) ---

; uart_init: COM1 115200 8N1, FIFO on, DTR/RTS/OUT2
uart_init:
        mov     dx, COM1 + 1
        xor     al, al
        out     dx, al                  ; IER = 0 (no interrupts)
        mov     dx, COM1 + 3
        mov     al, 0x80
        out     dx, al                  ; DLAB = 1
        mov     dx, COM1 + 0
        mov     al, 1
        out     dx, al                  ; divisor low = 1 (115200 baud)
        mov     dx, COM1 + 1
        xor     al, al
        out     dx, al                  ; divisor high = 0
        mov     dx, COM1 + 3
        mov     al, 0x03
        out     dx, al                  ; 8N1, DLAB = 0
        mov     dx, COM1 + 2
        mov     al, 0xC7
        out     dx, al                  ; FIFO enable + clear
        mov     dx, COM1 + 4
        mov     al, 0x0B
        out     dx, al                  ; DTR, RTS, OUT2
        ret

; putc: AL = character -> COM1.  Preserves all registers.
putc:
        pusha
        mov     bl, al
        mov     cx, 0xFFFF              ; bounded wait for THR empty
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
        ; No INT 10h mirror on purpose: with -nographic QEMU hands SeaBIOS
        ; "etc/sercon-port", so INT 10h output would ALSO land on COM1 and
        ; interleave with the direct UART writes.
        popa
        ret

; puts: DS:SI = NUL-terminated string
puts:
        push    ax
        push    si
.next:
        lodsb
        test    al, al
        jz      .done
        call    putc
        jmp     .next
.done:
        pop     si
        pop     ax
        ret

halt_forever:
        cli
        hlt
        jmp     halt_forever

boot_drive:     db 0
stage2_dap:     db 0x10, 0
                dw STAGE2_SECTORS
                dw STAGE2_ADDR, 0
                dq 1
msg_loadfail:   db "v2p-guest: cannot load stage 2", 13, 10, 0

%if ($ - $$) > 446
%error "stage 1 does not fit in front of the partition table"
%endif
                times 446 - ($ - $$) db 0
partition_table:
                times 64 db 0           ; empty partition table
                dw 0xAA55               ; bytes 510-511: 55 AA

; ------------------------------- stage 2 -----------------------------------
stage2_start:
stage2:
        ; SeaBIOS leaves "Booting from Hard Disk.." unterminated on the serial
        ; console; start on a fresh line so every v2p-guest line starts a line.
        call    crlf
        call    get_edd
        call    load_kernel
        call    find_boot_controller

%ifdef DEBUG_EDD
        call    debug_dump
%endif

        ; ---- line 1: controller ----
        mov     si, msg_prefix
        call    puts
        mov     si, msg_ctrl
        call    puts
        mov     si, [ctrl_name]
        call    puts
        mov     si, msg_pci
        call    puts
        mov     ax, [ctrl_vendor]
        call    puthex16
        mov     al, ':'
        call    putc
        mov     ax, [ctrl_device]
        call    puthex16
        call    crlf

        ; ---- line 2: sector count ----
        mov     si, msg_prefix
        call    puts
        mov     si, msg_sectors
        call    puts
        mov     eax, [total_lo]
        mov     edx, [total_hi]
        call    put_count
        call    crlf

        ; ---- line 3: last-sector marker ----
        mov     si, msg_prefix
        call    puts
        mov     si, msg_marker
        call    puts
        call    print_marker
        call    crlf

%ifdef WINDOWS_STANDIN
        jmp     standin_main            ; standin.inc: never returns
%else
        ; ---- one line per BIOS hard disk ----
        call    report_disks

        ; ---- last line: poweroff ----
        mov     si, msg_prefix
        call    puts
        mov     si, msg_poweroff
        call    puts
        call    crlf
        call    uart_drain
        mov     cx, SHUTDOWN_TICKS      ; an OS does not power off the instant
        call    wait_ticks              ; it has loaded (see wait_ticks)
        call    acpi_poweroff
        jmp     halt_forever
%endif

; ---------------------------------------------------------------------------
; load_kernel: read the "kernel" as a boot loader loads kernel + initrd:
; KERNEL_BYTES of the boot disk from the first sector behind stage 2 (or up
; to the last sector but one, if the disk ends sooner), with INT 13h AH=42h
; in chunks of up to 127 sectors into the scratch segment KERNEL_SEG.  What
; is read is thrown away: the point is the boot disk's read counters, which
; is all a hypervisor sees of a real OS that prints nothing (QEMU
; query-blockstats rd_bytes, PVE status/current blockstat).  A read error
; ends the load quietly; the printed lines do not change.
load_kernel:
        mov     ecx, 512                ; bytes per sector: EDD's, else 512
        cmp     byte [edd_ok], 1
        jne     .bps
        movzx   eax, word [EDD_BUF + 0x18]
        cmp     eax, 512                ; only 512..4096, a power of two in practice
        jb      .bps
        cmp     eax, 4096
        ja      .bps
        mov     ecx, eax
.bps:
        xor     edx, edx
        mov     eax, 127 * 512          ; sectors per call: fits one 64 KiB segment
        div     ecx
        mov     [kern_chunk], ax
        xor     edx, edx
        mov     eax, KERNEL_BYTES
        div     ecx
        mov     [kern_left], eax
        cmp     byte [edd_ok], 1        ; without a size: read until an error
        jne     .next
        cmp     dword [total_hi], 0
        jne     .next
        mov     eax, [total_lo]
        sub     eax, KERNEL_FIRST_LBA + 1   ; keep off the last sector
        jbe     .done
        cmp     eax, [kern_left]
        jae     .next
        mov     [kern_left], eax
.next:
        mov     eax, [kern_left]
        test    eax, eax
        jz      .done
        movzx   ecx, word [kern_chunk]
        cmp     eax, ecx
        jae     .call
        mov     ecx, eax
.call:
        mov     si, DAP_BUF
        mov     word [si], 0x0010       ; size 16, reserved 0
        mov     [si + 2], cx            ; sectors
        mov     word [si + 4], 0        ; offset
        mov     word [si + 6], KERNEL_SEG
        mov     eax, [kern_lba]
        mov     [si + 8], eax
        mov     dword [si + 12], 0
        mov     dl, [boot_drive]
        mov     ah, 0x42
        int     0x13
        jc      .done
        movzx   eax, word [DAP_BUF + 2] ; what the BIOS says it transferred
        test    eax, eax
        jz      .done
        add     [kern_lba], eax
        sub     [kern_left], eax
        jae     .next                   ; (a BIOS reporting more than asked: done)
.done:
        ret

; wait_ticks: CX timer ticks (IRQ0 at 18.2 Hz, counted by the BIOS at
; 0040:006C), halting between them as an idle OS does (~0 host CPU).
wait_ticks:
        sti
.tick:
        mov     eax, [0x46C]
.same:
        hlt
        cmp     eax, [0x46C]
        je      .same
        loop    .tick
        ret

; ---------------------------------------------------------------------------
; get_edd: INT 13h AH=48h on the boot drive -> EDD_BUF, total_lo/hi, edd_ok
get_edd:
        mov     di, EDD_BUF
        mov     cx, 0x50
        xor     al, al
        rep stosb                       ; clear the buffer
        mov     word [EDD_BUF], EDD_BUF_SIZE
        mov     si, EDD_BUF
        mov     dl, [boot_drive]
        mov     ah, 0x48
        int     0x13
        jc      .fail
        mov     eax, [EDD_BUF + 0x10]   ; total sectors (qword)
        mov     [total_lo], eax
        mov     eax, [EDD_BUF + 0x14]
        mov     [total_hi], eax
        mov     byte [edd_ok], 1
.fail:
        ret

; ---------------------------------------------------------------------------
; find_boot_controller: fills ctrl_vendor/ctrl_device/ctrl_name (+ method)
find_boot_controller:
        cmp     byte [edd_ok], 1
        jne     .fallback
        ; Validate the device path information by its key, its length and its
        ; checksum - NOT by the returned table size at offset 0: SeaBIOS 1.16
        ; fills the EDD 3.0 block but leaves size = 1Eh (observed under QEMU
        ; 7.2).  The buffer was zeroed before the call, so stale data cannot
        ; pass these checks.
        cmp     word [EDD_BUF + 0x1E], 0xBEDD
        jne     .fallback
        movzx   cx, byte [EDD_BUF + 0x20]   ; 24h (Phoenix) or 2Ch (T13)
        cmp     cl, 0x24
        je      .lenok
        cmp     cl, 0x2C
        jne     .fallback
.lenok:
        mov     si, EDD_BUF + 0x1E
        xor     ah, ah
.sum:                                   ; bytes 1Eh .. 1Eh+len-1 sum to 0
        lodsb
        add     ah, al
        loop    .sum
        test    ah, ah
        jnz     .fallback
        cmp     word [EDD_BUF + 0x24], 'PC'
        jne     .fallback
        cmp     byte [EDD_BUF + 0x26], 'I'
        jne     .fallback
        ; interface path for PCI: byte 0 bus, 1 device, 2 function, 3 channel
        movzx   bx, byte [EDD_BUF + 0x30]
        shl     bx, 8
        mov     al, [EDD_BUF + 0x31]
        and     al, 0x1F
        shl     al, 3
        mov     ah, [EDD_BUF + 0x32]
        and     ah, 0x07
        or      al, ah
        or      bl, al                  ; BX = bus<<8 | dev<<3 | fn
        xor     cl, cl
        call    pci_read32
        cmp     ax, 0xFFFF
        je      .fallback               ; nothing there: do not trust the path
        mov     byte [method], 'E'
        jmp     .found

.fallback:
        mov     byte [method], 'S'
        mov     eax, 0xFFFFFFFF
        mov     [addon_id], eax
        mov     [virtio_id], eax
        mov     [chip_id], eax
        mov     di, scan_storage_cb
        call    pci_scan_bus0
        mov     eax, [addon_id]         ; rank A
        cmp     ax, 0xFFFF
        jne     .found
%ifdef WINDOWS_STANDIN
        ; The stand-in is booted with an extra virtio-blk disk next to a
        ; q35 AHCI boot disk (which has no EDD path), so here virtio must
        ; not win over the built-in: SeaBIOS always gives virtio boot drives
        ; an EDD path, i.e. a virtio boot drive never reaches this fallback.
        ; Order A, C, B (C is always present on i440fx/q35).
        mov     eax, [chip_id]          ; rank C
        cmp     ax, 0xFFFF
        jne     .found
        mov     eax, [virtio_id]        ; rank B, may be FFFF:FFFF -> unknown
%else
        mov     eax, [virtio_id]        ; rank B
        cmp     ax, 0xFFFF
        jne     .found
        mov     eax, [chip_id]          ; rank C, may be FFFF:FFFF -> unknown
%endif

.found:                                 ; EAX = device<<16 | vendor
        mov     [ctrl_vendor], ax
        shr     eax, 16
        mov     [ctrl_device], ax
        ; look the pair up in the name table
        mov     si, ctrl_table
.lookup:
        mov     ax, [si]
        test    ax, ax
        jz      .unknown
        cmp     ax, [ctrl_vendor]
        jne     .nextent
        mov     ax, [si + 2]
        cmp     ax, [ctrl_device]
        jne     .nextent
        mov     ax, [si + 4]
        mov     [ctrl_name], ax
        ret
.nextent:
        add     si, 6
        jmp     .lookup
.unknown:
        mov     word [ctrl_name], name_unknown
        ret

; scan callback: BX = bdf, EAX = id.  Records the first storage controller
; of each rank (see the header); stops at the first rank-A controller.
scan_storage_cb:
        push    eax
        mov     cl, 0x08
        call    pci_read32              ; class code in bits 31..24
        shr     eax, 24
        cmp     al, 0x01
        pop     eax
        jne     .cont
        mov     si, chip_id
        cmp     eax, 0x70108086         ; PIIX3 IDE (i440fx built-in)
        je      .keep
        cmp     eax, 0x29228086         ; ICH9 AHCI: built-in only at q35's
        jne     .notchip                ; fixed slot 00:1f.2 (bdf 0x00FA);
        cmp     bx, 0x00FA              ; an AHCI added to i440fx (PVE's
        je      .keep                   ; sataN there) is an add-on (rank A)
.notchip:
        mov     si, virtio_id
        cmp     ax, 0x1AF4              ; virtio (Red Hat / Qumranet)
        je      .keep
        mov     [addon_id], eax         ; first rank-A HBA: done
        stc
        ret
.keep:
        cmp     word [si], 0xFFFF       ; keep only the first of each rank
        jne     .cont
        mov     [si], eax
.cont:
        clc
        ret

; ---------------------------------------------------------------------------
; pci_read32: BX = bdf (bus<<8|dev<<3|fn), CL = register -> EAX
pci_read32:
        push    dx
        movzx   eax, bx
        shl     eax, 8
        mov     al, cl
        and     al, 0xFC
        or      eax, 0x80000000
        mov     dx, 0xCF8
        out     dx, eax
        mov     dx, 0xCFC
        in      eax, dx
        pop     dx
        ret

; pci_scan_bus0: calls DI for each present function on bus 0 with BX = bdf,
; EAX = device<<16|vendor.  The callback returns CF=1 to stop the scan.
; Functions 1..7 are only probed when function 0 has the multi-function bit.
pci_scan_bus0:
        xor     bx, bx
.dev:
        xor     cl, cl
        call    pci_read32
        cmp     ax, 0xFFFF
        je      .nextdev                ; no function 0 -> no device
        push    bx
        call    di
        pop     bx
        jc      .stop
        mov     cl, 0x0C
        call    pci_read32              ; header type in bits 23..16
        test    eax, 0x00800000
        jz      .nextdev
.fn:                                    ; multi-function: functions 1..7
        inc     bx
        test    bl, 7
        jz      .devdone                ; wrapped into the next device
        xor     cl, cl
        call    pci_read32
        cmp     ax, 0xFFFF
        je      .fn
        push    bx
        call    di
        pop     bx
        jc      .stop
        jmp     .fn
.nextdev:
        and     bl, 0xF8
        add     bx, 8
.devdone:
        cmp     bx, 0x0100              ; 32 devices * 8 functions on bus 0
        jb      .dev
        clc
        ret
.stop:
        stc
        ret

%ifndef WINDOWS_STANDIN
; ---------------------------------------------------------------------------
; report_disks: one line per BIOS hard disk, 0x80 up, as many as INT 13h
; AH=08h on drive 80h counts (at most 8):
;   v2p-guest: disk 0x<dd> sectors=<n> marker=<TEXT>|<none>|<read-error>
; sectors and marker as for the boot disk (EDD AH=48h, last sector read with
; AH=42h); a drive whose EDD call fails prints sectors=? marker=<none>.
; SeaBIOS numbers its drives in boot order: 80h is the boot disk, the disks
; with a bootindex follow in that order, then the rest in the order SeaBIOS
; found them.
report_disks:
        mov     dl, 0x80
        xor     di, di
        mov     es, di                  ; ES:DI = 0:0 guards against BIOS bugs (RBIL)
        mov     ah, 0x08
        int     0x13
        push    word 0                  ; ES back to 0 (push/pop keep CF)
        pop     es
        jc      .done
        movzx   cx, dl                  ; number of hard disks
        cmp     cx, 8
        jbe     .count_ok
        mov     cx, 8
.count_ok:
        mov     byte [disk_drive], 0x80
.next:
        jcxz    .done
        push    cx
        call    report_disk
        pop     cx
        inc     byte [disk_drive]
        dec     cx
        jmp     .next
.done:
        ret

; report_disk: the line for drive [disk_drive]
report_disk:
        mov     si, msg_prefix
        call    puts
        mov     si, msg_disk
        call    puts
        mov     al, [disk_drive]
        call    puthex8
        mov     si, msg_disk_sectors
        call    puts
        mov     di, EDD_BUF
        mov     cx, 0x50
        xor     al, al
        rep stosb
        mov     word [EDD_BUF], EDD_BUF_SIZE
        mov     si, EDD_BUF
        mov     dl, [disk_drive]
        mov     ah, 0x48
        int     0x13
        jc      .no_edd
        mov     eax, [EDD_BUF + 0x10]
        mov     edx, [EDD_BUF + 0x14]
        call    put_count
        mov     si, msg_disk_marker
        call    puts
        mov     bl, [disk_drive]
        call    put_marker
        call    crlf
        ret
.no_edd:
        mov     al, '?'
        call    putc
        mov     si, msg_disk_marker
        call    puts
        mov     si, msg_none
        call    puts
        call    crlf
        ret
%endif

; ---------------------------------------------------------------------------
; put_count: EDX:EAX sectors, in decimal; above 4G sectors as 0x<hex64>
put_count:
        pushad
        test    edx, edx
        jnz     .hex
        call    putdec32
        popad
        ret
.hex:
        push    eax
        mov     al, '0'
        call    putc
        mov     al, 'x'
        call    putc
        mov     eax, edx
        call    puthex32
        pop     eax
        call    puthex32
        popad
        ret

; ---------------------------------------------------------------------------
; print_marker: put_marker for the boot drive, "<none>" without EDD.
print_marker:
        cmp     byte [edd_ok], 1
        jne     put_marker.none
        mov     eax, [total_lo]
        mov     edx, [total_hi]
        mov     bl, [boot_drive]
; put_marker: BL = drive, EDX:EAX = its total sectors.  Extended read of LBA
; total-1 into SEC_BUF; print printable ASCII up to the first NUL/non-printable
; byte (max 64), or "<none>".
put_marker:
        mov     ecx, eax
        or      ecx, edx
        jz      .none                   ; zero-sized disk?
        sub     eax, 1
        sbb     edx, 0
        mov     si, DAP_BUF
        mov     word [si], 0x0010       ; size 16, reserved 0
        mov     word [si + 2], 1        ; one sector
        mov     word [si + 4], SEC_BUF  ; offset
        mov     word [si + 6], 0        ; segment
        mov     [si + 8], eax
        mov     [si + 12], edx
        mov     byte [SEC_BUF], 0
        mov     dl, bl
        mov     ah, 0x42
        int     0x13
        jc      .readerr
        mov     si, SEC_BUF
        xor     cx, cx
.loop:
        cmp     cx, 64
        jae     .done
        lodsb
        cmp     al, 0x20
        jb      .done
        cmp     al, 0x7E
        ja      .done
        call    putc
        inc     cx
        jmp     .loop
.done:
        test    cx, cx
        jz      .none
        ret
.none:
        mov     si, msg_none
        call    puts
        ret
.readerr:
        mov     si, msg_readerr
        call    puts
        ret

; ---------------------------------------------------------------------------
; acpi_poweroff: PMBASE from PIIX4 PM (8086:7113) or ICH9 LPC (8086:2918)
; config register 0x40 (bit 0 = I/O space indicator, masked off); write
; SLP_EN (bit 13) with SLP_TYP 0 (QEMU's S5) to PM1a_CNT = PMBASE + 4.
acpi_poweroff:
        mov     word [pm_bdf], 0xFFFF
        mov     di, scan_pm_cb
        call    pci_scan_bus0
        mov     bx, [pm_bdf]
        cmp     bx, 0xFFFF
        je      .fail
        mov     cl, 0x40
        call    pci_read32
        and     ax, 0xFFFE
        jz      .fail
        mov     dx, ax
        add     dx, 4
        mov     ax, 0x2000
        out     dx, ax
        ; give the machine a moment to go away
        mov     cx, 0xFFFF
.spin:
        in      al, 0x80                ; harmless I/O delay
        loop    .spin
.fail:
        ret

scan_pm_cb:
        cmp     eax, 0x71138086         ; PIIX4 PM (i440fx, usually 00:01.3)
        je      .hit
        cmp     eax, 0x29188086         ; ICH9 LPC (q35, 00:1f.0)
        je      .hit
        clc
        ret
.hit:
        mov     [pm_bdf], bx
        stc
        ret

; uart_drain: wait (bounded) until transmitter holding + shift regs are empty
uart_drain:
        mov     cx, 0xFFFF
        mov     dx, COM1 + 5
.w:
        in      al, dx
        test    al, 0x40
        jnz     .ok
        loop    .w
.ok:
        ret

; ---------------------------------------------------------------------------
; number output
crlf:
        mov     al, 13
        call    putc
        mov     al, 10
        call    putc
        ret

; puthex32: EAX, 8 lowercase hex digits
puthex32:
        push    eax
        shr     eax, 16
        call    puthex16
        pop     eax
; puthex16: AX, 4 lowercase hex digits
puthex16:
        push    ax
        push    cx
        push    bx
        mov     bx, ax
        mov     cx, 4
.d:
        rol     bx, 4
        mov     al, bl
        and     al, 0x0F
        add     al, '0'
        cmp     al, '9'
        jbe     .out
        add     al, 'a' - '0' - 10
.out:
        call    putc
        loop    .d
        pop     bx
        pop     cx
        pop     ax
        ret

; puthex8: AL, 2 lowercase hex digits (puthex16's loop on the high byte)
puthex8:
        push    ax
        push    cx
        push    bx
        mov     bh, al
        xor     bl, bl
        mov     cx, 2
        jmp     puthex16.d

; putdec32: EAX unsigned decimal
putdec32:
        pushad
        mov     ebx, 10
        xor     cx, cx
.div:
        xor     edx, edx
        div     ebx
        push    dx
        inc     cx
        test    eax, eax
        jnz     .div
.emit:
        pop     ax
        add     al, '0'
        call    putc
        loop    .emit
        popad
        ret

%ifdef DEBUG_EDD
; debug_dump: "v2p-guest: debug method=<E|S> edd=<hex bytes of EDD_BUF>"
debug_dump:
        mov     si, msg_prefix
        call    puts
        mov     si, msg_debug
        call    puts
        mov     al, [method]
        call    putc
        mov     al, ' '
        call    putc
        mov     al, [edd_ok]
        add     al, '0'
        call    putc
        mov     al, ' '
        call    putc
        mov     si, EDD_BUF
        mov     cx, EDD_BUF_SIZE
.b:
        lodsb
        push    cx
        mov     bx, ax
        mov     al, bl
        shr     al, 4
        call    .nib
        mov     al, bl
        call    .nib
        pop     cx
        loop    .b
        call    crlf
        ret
.nib:
        and     al, 0x0F
        add     al, '0'
        cmp     al, '9'
        jbe     .p
        add     al, 'a' - '0' - 10
.p:
        call    putc
        ret
msg_debug:      db "debug method=", 0
%endif

%ifdef WINDOWS_STANDIN
%include "standin.inc"
%endif

; ---------------------------------------------------------------------------
; data
ctrl_table:                             ; vendor, device, name
        dw 0x8086, 0x7010, name_ide
        dw 0x8086, 0x2922, name_sata
        dw 0x1AF4, 0x1001, name_vblk
        dw 0x1AF4, 0x1042, name_vblk
        dw 0x1AF4, 0x1004, name_vscsi
        dw 0x1AF4, 0x1048, name_vscsi
        dw 0x1000, 0x0012, name_lsi
        dw 0

name_ide:       db "ide", 0
name_sata:      db "sata", 0
name_vblk:      db "virtio-blk", 0
name_vscsi:     db "virtio-scsi", 0
name_lsi:       db "lsi", 0
name_unknown:   db "unknown", 0

msg_prefix:     db "v2p-guest: ", 0
msg_ctrl:       db "boot controller=", 0
msg_pci:        db " pci=", 0
msg_sectors:    db "disk sectors=", 0
msg_marker:     db "last-sector marker=", 0
msg_none:       db "<none>", 0
msg_readerr:    db "<read-error>", 0
msg_poweroff:   db "poweroff", 0
msg_disk:       db "disk 0x", 0
msg_disk_sectors: db " sectors=", 0
msg_disk_marker: db " marker=", 0
disk_drive:     db 0x80

edd_ok:         db 0
method:         db '?'
total_lo:       dd 0
total_hi:       dd 0
ctrl_vendor:    dw 0xFFFF
ctrl_device:    dw 0xFFFF
ctrl_name:      dw name_unknown
addon_id:       dd 0xFFFFFFFF
virtio_id:      dd 0xFFFFFFFF
chip_id:        dd 0xFFFFFFFF
pm_bdf:         dw 0xFFFF
kern_lba:       dd KERNEL_FIRST_LBA
kern_left:      dd 0
kern_chunk:     dw 127

                align 512, db 0
stage2_end:

STAGE2_SECTORS  equ (stage2_end - stage2_start) / 512
KERNEL_FIRST_LBA equ 1 + STAGE2_SECTORS
