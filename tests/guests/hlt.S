/* HLT guest (CPL 0, a handful of instructions): writes 1 to PORT_OUT, HLT, then (at `second`) writes 2 to
 * PORT_OUT, HLT. */
#include "ports.h"
    .code64
    .text
    .globl _start, second
_start:
    mov $1, %eax
    out %eax, $PORT_OUT
    hlt
second:
    mov $2, %eax
    out %eax, $PORT_OUT
    hlt
1:  jmp 1b
