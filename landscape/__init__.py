"""Loss-landscape instruments (Hessian, spectra, surfaces)."""

__version__ = "0.1.0"
