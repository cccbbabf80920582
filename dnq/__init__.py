"""DNQ: differential noise-driven quantization-ready training."""

__version__ = "0.1.0"
