"""DNQ: differential noise-driven quantization-ready training."""

__version__ = "0.1.0"


def load_run(path, device="cpu", *, data=None, data_root=None):
    """Load a finished ``dnq train`` run folder: :func:`dnq.run.load_run`."""
    from .run import load_run as _load_run

    return _load_run(path, device, data=data, data_root=data_root)
