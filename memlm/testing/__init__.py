"""Independent references and shared cases for memlm's tests (and for checking a new kernel)."""
