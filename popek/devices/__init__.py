"""Emulated platform devices; each sees only register offsets, guest memory and an interrupt line."""
