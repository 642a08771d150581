"""The recon layer's error: input that cannot be reconstructed. Its own module so that every recon module can
raise it without importing the entry point (``recon.api`` re-exports it for callers)."""


class ReconError(ValueError):
    """Unusable input for the reconstruction; the message names the problem."""
