/* Spinning guest for kick/pause/resume/sampling: writes 'R' to PORT_OUT, then increments the 64-bit `counter`
 * forever at CPL 3 between the labels spin_loop and spin_end. */
#include "guest.h"

kernel_setup:
    ret

guest_irq:
    jmp report_fault

user_main:
    mov $0x52, %eax          /* 'R' */
    out %eax, $PORT_OUT
    .globl spin_loop, spin_end, counter
spin_loop:
    incq counter(%rip)
    jmp spin_loop
spin_end:

    .balign 4096                                /* not next to the code: stores there would be self-modifying code */
counter:
    .quad 0
