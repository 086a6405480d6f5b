"""unidml: deep metric learning with cross-entropy and pairwise losses, at scale."""

__version__ = "0.1.0"
