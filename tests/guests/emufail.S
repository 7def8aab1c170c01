/* Emulation-failure guest (CPL 0): executes `lock cmpxchg16b`, which kvm_pvm's CPL 0 emulator cannot emulate
 * (KVM_EXIT_INTERNAL_ERROR, suberror 1, with the instruction bytes), then writes 1 to PORT_OUT and HLTs. */
#include "ports.h"
    .code64
    .text
    .globl _start, insn, after
_start:
    xor %eax, %eax
    xor %edx, %edx
    xor %ebx, %ebx
    xor %ecx, %ecx
insn:
    lock cmpxchg16b target(%rip)
after:
    mov $1, %eax
    out %eax, $PORT_OUT
    hlt
1:  jmp 1b

    .balign 16
target:
    .quad 0, 0
