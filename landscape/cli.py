"""The ``landscape`` command. The instruments (Hessian trace, eigenvalues, spectral density,
loss surfaces) and the study/report commands are added by the next issues."""

from __future__ import annotations

import argparse

from . import __version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="landscape", description="Loss-landscape instruments for PyTorch models.")
    p.add_argument("--version", action="version", version=f"landscape {__version__}")
    p.parse_args(argv)
    p.print_help()
    return 0
