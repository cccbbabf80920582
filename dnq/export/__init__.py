"""Export a quantized model to ONNX (QuantizeLinear / DequantizeLinear), and check it in onnxruntime.

* :func:`to_onnx` (:mod:`dnq.export.onnx_graph`): any model the toolkit's PTQ makes (``rtn``,
  ``rtn+bn``, AdaRound, BRECQ, QDrop; either convention; mixed precision) as a standard QDQ graph:
  weights stored as integers (INT4/UINT4 from opset 21, INT2/UINT2 from 25, else 8-bit),
  activations quantized with the calibrated scales and zero points, BatchNorm folded, and
  optionally the input normalization in front so that the file takes raw ``uint8`` images.
* :func:`round_trip` (:mod:`dnq.export.roundtrip`): the export run in onnxruntime against the
  fake-quantized model: accuracies, argmax agreement, logit differences, and where they differ.
* :func:`export_run` (:mod:`dnq.export.command`): ``dnq export``, a run folder to a file and
  its JSON sidecar.

The ``onnx`` and ``onnxruntime`` packages are the ``export`` extra
(``pip install 'dnq-landscape[export]'``), imported only when an export runs.

Example:
    >>> import os, tempfile, torch
    >>> from dnq.models import build_model
    >>> from dnq.ptq import apply_ptq
    >>> from dnq.export import Normalization, round_trip, to_onnx
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("cnn-digits", 10, 1, 8).eval()
    >>> qmodel = apply_ptq(model, "rtn+bn", 4, 4, torch.randn(128, 1, 8, 8))
    >>> norm = Normalization(mean=(0.3,), std=(0.4,), max_value=16.0)  # the file takes raw 0..16 images
    >>> info = to_onnx(qmodel, torch.randn(2, 1, 8, 8), os.path.join(tempfile.mkdtemp(), "q.onnx"),
    ...                normalization=norm)
    >>> sorted({w["container"] for w in info["weights"]})   # 4-bit layers as INT4, first and last at 8 bits
    ['INT4', 'INT8']
    >>> images = torch.randint(0, 17, (64, 1, 8, 8), dtype=torch.uint8)
    >>> r = round_trip(qmodel, info["path"], images, torch.randint(0, 10, (64,)), norm)
    >>> r["agreement"] >= 0.98, r["n"]   # a value at a level boundary may round the other way (roundtrip's notes)
    (True, 64)
"""

from __future__ import annotations

from .command import CheckFailed, export_run, sidecar_path
from .errors import ExportError, MissingDependency
from .onnx_graph import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    SUPPORTED,
    Normalization,
    build_onnx,
    checker,
    container,
    to_onnx,
)
from .roundtrip import ACC_TOLERANCE, MIN_AGREEMENT, round_trip, session

__all__ = ["ACC_TOLERANCE", "DEFAULT_OPSET", "MAX_OPSET", "MIN_AGREEMENT", "MIN_OPSET", "SUPPORTED", "CheckFailed",
           "ExportError", "MissingDependency", "Normalization", "build_onnx", "checker", "container", "export_run",
           "round_trip", "session", "sidecar_path", "to_onnx"]
