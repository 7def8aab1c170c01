/* MMIO guest: at CPL 3, writes 4, 8 and 1 bytes to MMIO_BASE (0x10000000, outside guest RAM), reads 4, 8 and 1
 * bytes back from MMIO_BASE+0x10/+0x18/+0x20 and reports each read on PORT_OUT (the 8-byte one as low, high
 * halves), then writes PORT_DONE and spins. */
#include "guest.h"
#define MMIO_BASE 0x10000000

kernel_setup:
    ret

guest_irq:
    jmp report_fault

user_main:
    movl $0x12345678, MMIO_BASE
    movabs $0x0123456789abcdef, %rax
    movq %rax, MMIO_BASE + 8
    movb $0xab, MMIO_BASE + 3
    movl MMIO_BASE + 0x10, %eax
    out %eax, $PORT_OUT
    movq MMIO_BASE + 0x18, %rax
    out %eax, $PORT_OUT
    shr $32, %rax
    out %eax, $PORT_OUT
    movzbl MMIO_BASE + 0x20, %eax
    out %eax, $PORT_OUT
    xor %eax, %eax
    out %al, $PORT_DONE
1:  jmp 1b
