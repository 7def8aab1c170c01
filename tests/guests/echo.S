/* Port I/O guest, all at CPL 3: echoes 32-bit values read from PORT_IN to PORT_OUT until it reads 0, sends
 * "popek!" with `rep outsb` to PORT_STR_OUT, reads four 16-bit words with `rep insw` from PORT_STR_IN and writes
 * them to PORT_RESULT as two 32-bit values, then writes 0 to PORT_DONE and spins. */
#include "guest.h"

kernel_setup:
    ret

guest_irq:
    jmp report_fault

user_main:
1:  mov $PORT_IN, %dx
    in %dx, %eax
    out %eax, $PORT_OUT
    test %eax, %eax
    jnz 1b
    cld
    lea msg(%rip), %rsi
    mov $(msg_end - msg), %ecx
    mov $PORT_STR_OUT, %dx
    rep outsb
    lea buf(%rip), %rdi
    mov $4, %ecx
    mov $PORT_STR_IN, %dx
    rep insw
    mov buf(%rip), %eax
    out %eax, $PORT_RESULT
    mov buf + 4(%rip), %eax
    out %eax, $PORT_RESULT
    xor %eax, %eax
    out %al, $PORT_DONE
2:  jmp 2b

msg:
    .ascii "popek!"
msg_end:
    .balign 8
buf:
    .quad 0
