/* Common runtime of Popek's KVM test guests (GNU as via cpp, x86-64, linked at LOAD_ADDRESS, flat binary).
 *
 * The VMM enters _start in 64-bit long mode at CPL 0 (popek.boot.x86.setup_long_mode). CPL 0 is emulated (slow) on
 * kvm_pvm, so this does the minimum there: load a GDT (kernel + user segments + TSS), TR, an IDT of 256 stubs and
 * user-accessible identity page tables (0-1 GiB and 3-4 GiB in 2 MiB pages), call the guest's `kernel_setup`,
 * then iretq to the guest's `user_main` at CPL 3 with RFLAGS = USER_RFLAGS. Port I/O at CPL 3 is allowed by the
 * TSS I/O permission bitmap (all ports), not by IOPL: kvm_pvm runs CPL 3 natively with IOPL forced to 0 (IOPL 3
 * gave #GP there). Keep data the guest stores to often out of the code's page (self-modifying-code stalls).
 *
 * Exceptions (vectors 0-31) are reported on FAULT_PORT as three 32-bit writes: vector, error code (0 if none),
 * RIP[31:0]; then the vCPU halts. Vectors 32-255 jump to the guest's `guest_irq` with the vector pushed on top of
 * the interrupt frame (guest_irq pops it: `add $8, %rsp; iretq`; or `jmp report_fault` to treat it as a fault).
 * A guest defines `kernel_setup` (CPL 0, ends with ret), `user_main` (CPL 3) and `guest_irq`.
 * Everything, data included, lives in .text: the build keeps only that section.
 */
#include "ports.h"
#define LOAD_ADDRESS  0x100000
#define TSS_ADDR      0x1D0000
#define TSS_LIMIT     (104 + 8192)              /* TSS + I/O permission bitmap + terminator byte, minus 1 */
#define KERNEL_STACK  0x1E0000
#define USER_STACK    0x1F0000

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   (0x18 | 3)
#define USER_CS   (0x20 | 3)
#define TSS_SEL   0x28

#ifndef USER_RFLAGS
#define USER_RFLAGS 0x0002          /* IOPL 0, IF 0 */
#endif

/* Address of a .text label as an assemble-time constant (needed where the value is split into fields). */
#define ABS(label) ((label) - _start + LOAD_ADDRESS)

    .code64
    .text
    .globl _start
_start:
    mov $KERNEL_STACK, %esp
    lgdt gdt_ptr(%rip)
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    lea 1f(%rip), %rax
    pushq $KERNEL_CS
    push %rax
    lretq
1:  movq $KERNEL_STACK, TSS_ADDR + 4            /* TSS.RSP0 */
    movw $104, TSS_ADDR + 0x66                  /* I/O permission bitmap right after the TSS: all zero = */
    movb $0xff, TSS_ADDR + 104 + 8192           /* every port allowed (RAM starts zeroed); 0xff terminator */
    mov $TSS_SEL, %eax
    ltr %ax
    lidt idt_ptr(%rip)
    mov $pml4, %eax
    mov %rax, %cr3
    call kernel_setup
    pushq $USER_DS
    pushq $USER_STACK
    pushq $USER_RFLAGS
    pushq $USER_CS
    pushq $user_main
    iretq

/* 256 interrupt stubs, 16 bytes apart: push the vector, go to isr_common. */
    .balign 16
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    cmpq $32, (%rsp)
    jae guest_irq
report_fault:                                   /* also the target of a guest_irq that expects no interrupts */
    push %rax
    push %rcx
    mov 16(%rsp), %eax                          /* vector */
    out %eax, $FAULT_PORT
    cmp $32, %eax
    jae 1f
    mov $0x60227D00, %ecx                       /* vectors that push an error code: 8, 10-14, 17, 21, 29, 30 */
    bt %eax, %ecx
    jc 2f
1:
    xor %eax, %eax
    out %eax, $FAULT_PORT
    mov 24(%rsp), %eax                          /* RIP */
    jmp 3f
2:  mov 24(%rsp), %eax                          /* error code */
    out %eax, $FAULT_PORT
    mov 32(%rsp), %eax                          /* RIP */
3:  out %eax, $FAULT_PORT
4:  cli
    hlt
    jmp 4b

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff                    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff                    /* 0x10 kernel data */
    .quad 0x00cff2000000ffff                    /* 0x18 user data, DPL 3 */
    .quad 0x00affa000000ffff                    /* 0x20 user code, 64-bit, DPL 3 */
    .quad TSS_LIMIT | ((TSS_ADDR & 0xffffff) << 16) | (0x89 << 40) | ((TSS_ADDR >> 24) << 56)  /* 0x28 TSS */
    .quad 0
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 16
idt:
    .set vec, 0
    .rept 256
    .word ABS(isr_stubs + 16 * vec) & 0xffff
    .word KERNEL_CS
    .byte 0, 0x8e                               /* present, DPL 0, 64-bit interrupt gate */
    .word (ABS(isr_stubs + 16 * vec) >> 16) & 0xffff
    .long 0, 0
    .set vec, vec + 1
    .endr
idt_end:
idt_ptr:
    .word idt_end - idt - 1
    .quad idt

/* Identity map, user accessible (P|RW|US|PS = 0x87): 0-1 GiB (RAM, test MMIO) and 3-4 GiB (IOAPIC, LAPIC). */
    .balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 7, 0, 0, pd3 + 7
    .fill 508, 8, 0
pd0:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd3:
    .set i, 0
    .rept 512
    .quad (0xC0000000 + (i << 21)) | 0x87
    .set i, i + 1
    .endr
