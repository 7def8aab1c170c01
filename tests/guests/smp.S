/* Two-vCPU guest (CPL 0, no stack): each vCPU enters with its id in RDI, increments `arrived`, spins until both
 * vCPUs have arrived (so it finishes only if they run at the same time), writes its id to PORT_OUT, then HLT. */
#include "ports.h"
    .code64
    .text
    .globl _start, arrived
_start:
    lock incl arrived(%rip)
1:  cmpl $2, arrived(%rip)
    jne 1b
    mov %edi, %eax
    out %eax, $PORT_OUT
    hlt
2:  jmp 2b

    .balign 4
arrived:
    .long 0
