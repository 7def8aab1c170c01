"""Guest images built from Debian packages: kernels, initramfs, cache."""
