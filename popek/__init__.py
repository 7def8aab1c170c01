"""Popek: a virtual machine monitor on Linux KVM, scriptable from Python."""
