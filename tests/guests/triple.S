/* Triple-fault guest (CPL 0): loads an IDT with limit 0 and executes UD2: #UD cannot be delivered, neither can #DF,
 * so the vCPU shuts down (KVM_EXIT_SHUTDOWN). */
    .code64
    .text
    .globl _start
_start:
    lidt empty_idt(%rip)
    ud2
1:  jmp 1b

empty_idt:
    .word 0
    .quad 0
