"""Boot loaders: Linux x86 boot protocol, ELF, long-mode entry state, MP table."""
