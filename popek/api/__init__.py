"""The VMM's HTTP/JSON control API on a Unix socket, with Firecracker's resource names."""
