/* Counting guest for snapshot/restore: enables SSE at CPL 0, then at CPL 3 increments the 64-bit `counter` in
 * memory forever; every PERIOD increments it bumps a report number kept three ways -- in XMM0 (XSAVE state), in
 * R12 (general registers) and as counter / PERIOD (memory) -- and writes it to PORT_OUT if all three agree, else
 * 0xFFFFFFFF. A restored guest that lost or repeated state reports a gap, a repeat or the mismatch value. */
#include "guest.h"
#define PERIOD_SHIFT 16

kernel_setup:
    mov %cr4, %rax
    or $0x600, %rax                             /* OSFXSR | OSXMMEXCPT */
    mov %rax, %cr4
    ret

guest_irq:
    jmp report_fault

user_main:
    pcmpeqd %xmm1, %xmm1
    psrlq $63, %xmm1                            /* xmm1 = 1 in each quadword */
    pxor %xmm0, %xmm0
    xor %r12d, %r12d
    .globl count_loop
count_loop:
    incq counter(%rip)
    testl $((1 << PERIOD_SHIFT) - 1), counter(%rip)
    jnz count_loop
    paddq %xmm1, %xmm0
    inc %r12
    movq %xmm0, %rax
    mov counter(%rip), %rcx
    shr $PERIOD_SHIFT, %rcx
    cmp %rax, %r12
    jne 1f
    cmp %rcx, %r12
    je 2f
1:  mov $0xFFFFFFFF, %eax
2:  out %eax, $PORT_OUT
    jmp count_loop

    .balign 4096                                /* not next to the code: stores there would be self-modifying code */
    .globl counter
counter:
    .quad 0
