"""A fake vCPU holding kvm_regs/kvm_sregs for tests of code written against the VcpuFd contract (no KVM)."""

from popek.kvm.abi import kvm_regs, kvm_sregs


class FakeRegsVcpu:
    """``get_regs/set_regs/get_sregs/set_sregs`` over copies of ``self.regs`` / ``self.sregs``, as KVM's ioctls copy."""

    def __init__(self, index=0):
        self.index = index
        self.regs, self.sregs = kvm_regs(), kvm_sregs()

    def get_regs(self):
        return kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs):
        self.regs = kvm_regs.from_buffer_copy(regs)

    def get_sregs(self):
        return kvm_sregs.from_buffer_copy(self.sregs)

    def set_sregs(self, sregs):
        self.sregs = kvm_sregs.from_buffer_copy(sregs)
