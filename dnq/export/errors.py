"""The exporter's errors.

Example:
    >>> issubclass(ExportError, ValueError)
    True
"""

from __future__ import annotations

import importlib


class ExportError(ValueError):
    """A model, a setting or a file the exporter refuses; the message names it and the way out.
    Raised before anything is written."""


class MissingDependency(ExportError):
    """``onnx`` or ``onnxruntime`` is not installed."""


def require(module: str):
    """Import ``module`` (``"onnx"``, ``"onnxruntime"``), or raise :class:`MissingDependency` with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"the ONNX export needs {module}, which is not installed: "
                                "pip install 'dnq-landscape[export]' (onnx and onnxruntime)") from None


__all__ = ["ExportError", "MissingDependency", "require"]
