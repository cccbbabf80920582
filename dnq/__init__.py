"""DNQ: differential noise-driven quantization-ready training.

Example:
    >>> import dnq
    >>> dnq.__version__
    '0.1.0'
    >>> dnq.load_run("no/such/run")  # dnq.run.load_run, imported on first use
    Traceback (most recent call last):
    ...
    FileNotFoundError: no/such/run does not exist; give the folder of a trained run ...
"""

__version__ = "0.1.0"


def load_run(path, device="cpu", *, data=None, data_root=None):
    """Load a finished ``dnq train`` run folder: :func:`dnq.run.load_run`."""
    # imported on first use: ``import dnq`` (and dnq.errors, dnq.io) stays light, the trainer loads when needed
    from .run import load_run as _load_run  # noqa: PLC0415
    return _load_run(path, device, data=data, data_root=data_root)
