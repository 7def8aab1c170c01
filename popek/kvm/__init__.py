"""KVM API bindings: ABI structures and ioctl wrappers (Documentation/virt/kvm/api.rst)."""
