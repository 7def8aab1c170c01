/* Interrupt guest: at CPL 0 masks both 8259 PICs, software-enables the local APIC (SVR) and points IOAPIC pin
 * IRQ_PIN at vector 0x30 (fixed, physical, edge, active high, destination APIC 0); then at CPL 3 with IF=1 writes
 * 'R' to PORT_OUT and spins. The vector 0x30 handler writes its running count to PORT_IRQ and EOIs the LAPIC. */
#define USER_RFLAGS 0x0202                /* IF 1 */
#include "guest.h"
#define IRQ_PIN 20
#define IOAPIC 0xFEC00000
#define LAPIC  0xFEE00000

kernel_setup:
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $LAPIC, %eax                            /* above 2 GiB: not a disp32, go through a register */
    movl $0x1ff, 0xF0(%rax)                     /* SVR: APIC enabled, spurious vector 0xFF */
    mov $IOAPIC, %eax
    movl $(0x10 + 2 * IRQ_PIN), (%rax)          /* IOREGSEL: redirection entry, low dword */
    movl $0x30, 0x10(%rax)                      /* IOWIN */
    movl $(0x11 + 2 * IRQ_PIN), (%rax)
    movl $0, 0x10(%rax)
    ret

guest_irq:
    cmpq $0x30, (%rsp)
    jne report_fault
    push %rax
    push %rcx
    incl irq_count(%rip)
    mov irq_count(%rip), %eax
    out %eax, $PORT_IRQ
    mov $LAPIC, %ecx
    movl $0, 0xB0(%rcx)                         /* EOI */
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq

user_main:
    mov $0x52, %eax          /* 'R' */
    out %eax, $PORT_OUT
1:  pause
    jmp 1b

    .balign 4
irq_count:
    .long 0
