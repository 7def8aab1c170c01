"""Host-side networking for guests: tap devices and MAC addresses."""
