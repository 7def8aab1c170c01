/* FPU-state guest: enables SSE (CR4.OSFXSR|OSXMMEXCPT) at CPL 0, then at CPL 3 reports MXCSR (stmxcsr) and the
 * x87 control word (fnstcw) on PORT_OUT, writes PORT_DONE and spins. */
#include "guest.h"

kernel_setup:
    mov %cr4, %rax
    or $0x600, %rax
    mov %rax, %cr4
    ret

guest_irq:
    jmp report_fault

user_main:
    stmxcsr val(%rip)
    mov val(%rip), %eax
    out %eax, $PORT_OUT
    fnstcw val(%rip)
    movzwl val(%rip), %eax
    out %eax, $PORT_OUT
    out %al, $PORT_DONE
1:  jmp 1b

    .balign 4096
val:
    .quad 0
