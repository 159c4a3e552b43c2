"""fasttune: kernel-accelerated post-training."""
__version__ = "0.1.0"
