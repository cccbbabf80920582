"""Run an exported model in onnxruntime and compare it with the fake-quantized model it came from.

The check of ``dnq export --check`` and of the tests: ``onnx.checker`` (full check, with shape
inference), then the test images through onnxruntime's CPU provider and through our model;
reported are both accuracies, the argmax agreement and the logits' differences.

Where the two can differ, and what was done about it:

* **Rounding mode.** ONNX's ``QuantizeLinear`` rounds half to even; so does our fake quantizer
  (``torch.round``). Same levels at exact ties.
* **Saturation.** ``QuantizeLinear`` saturates at its output type's range. A 2- or 4-bit
  activation held in a native INT2/INT4 type saturates at its own levels; one held in an 8-bit
  container would saturate at 0..255, so the exporter puts a ``Clip`` to the quantizer's levels
  between ``QuantizeLinear`` and ``DequantizeLinear``.
* **A BatchNorm folded into an already quantized weight** (``rtn+bn``): the product
  ``Q(W) * factor`` was one rounding away from the grid ``(q - z) * (scale * |factor|)`` that the
  file stores. The fold now writes the weight on that grid (:meth:`dnq.quant.WeightGrid.dequantized`),
  so that both compute the same weights.
* **Accumulation order.** onnxruntime's convolutions add in another order than PyTorch's, so a
  layer's float output can differ in the last bits; where such a value sits within that
  difference of a rounding boundary of the next quantizer, the two round to neighbouring levels.
  This is the difference that remains (the argmax agreement measures it).
* **The bias.** Our fake quantizer adds the float32 bias to the float accumulation, and the
  exported graph keeps it so. onnxruntime's default optimizations (its ``WeightBiasQuantization``
  pass) rewrite a float bias that follows quantized inputs into int32 at the accumulator scale
  ``s_x * s_w`` so that they can fuse integer kernels (``QLinearConv``); with coarse 2-4-bit
  scales that rounding moves outputs across the next quantizer's boundaries (measured on
  digits: up to 4% of the argmax decisions at W2A3 under the paper convention). The check
  therefore runs onnxruntime with that one pass off (:func:`session`, ``quantize_bias=False``;
  every other optimization on), which computes the exported graph, and reports onnxruntime's
  defaults beside it. onnxruntime 1.32 also builds ``QLinearConv`` nodes from 2-bit weights
  (opset 25) that its own kernels then refuse: the default session cannot load such a file.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.quant import quantize
    >>> from dnq.export import Normalization, build_onnx
    >>> _ = torch.manual_seed(0)
    >>> q = quantize(build_model("cnn-digits", 10, 1, 8).eval(), 4, 4, torch.randn(64, 1, 8, 8))
    >>> norm = Normalization((0.3,), (0.4,), 16.0)
    >>> proto, _ = build_onnx(q, torch.randn(2, 1, 8, 8), normalization=norm)
    >>> images, labels = torch.randint(0, 17, (50, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (50,))
    >>> r = round_trip(q, proto, images, labels, norm)
    >>> r["agreement"] >= 0.98, r["n"]
    (True, 50)
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from dnq_landscape_common.precision import full_precision

from .errors import ExportError, require
from .onnx_graph import Normalization, checker

OPTIMIZATIONS = ("disabled", "basic", "extended", "all")
"""onnxruntime's graph optimization levels; ``"all"`` is its default (and a deployment's)."""
ACC_TOLERANCE = 0.1
"""Largest accuracy difference (percentage points) the check accepts."""
MIN_AGREEMENT = 0.995
"""Smallest argmax agreement the check accepts."""


def session(model, optimization: str = "all", quantize_bias: bool = False, threads: int | None = None):
    """An onnxruntime CPU session on a ``ModelProto``, path or bytes.

    ``quantize_bias=False`` turns off onnxruntime's ``WeightBiasQuantization`` pass, which
    rewrites a float bias into int32 at the accumulator scale (input scale x weight scale) so
    that it can fuse integer kernels: the one place where its defaults compute something else
    than the exported graph (see the module's notes). True: onnxruntime's defaults."""
    ort = require("onnxruntime")
    if optimization not in OPTIMIZATIONS:
        raise ExportError(f"unknown optimization level {optimization!r}; valid: {', '.join(OPTIMIZATIONS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3
    data = os.fspath(model) if isinstance(model, (str, os.PathLike)) else (
        model if isinstance(model, bytes) else model.SerializeToString())
    disabled = [] if quantize_bias else ["WeightBiasQuantization"]
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def onnx_logits(sess, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """The session's logits for ``images`` (raw ``uint8`` images for a graph with its normalization,
    normalized float images otherwise), in batches."""
    name = sess.get_inputs()[0].name
    want = np.uint8 if sess.get_inputs()[0].type == "tensor(uint8)" else np.float32
    x = images.detach().cpu().numpy()
    if x.dtype != want:
        raise ExportError(f"the exported model takes {np.dtype(want).name} images, got {x.dtype}"
                          + ("; pass the raw uint8 images (the graph normalizes them)" if want == np.uint8 else ""))
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor, normalization: Normalization | None,
                 batch_size: int = 500) -> np.ndarray:
    """Our model's logits (float32, full precision) for the same ``images`` on the model's device."""
    dev = next(model.parameters()).device
    out = []
    with full_precision():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(dev)
            if normalization is not None:
                mean = torch.tensor(normalization.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
                std = torch.tensor(normalization.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
                x = (x.float() / normalization.max_value - mean) / std
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out)


def round_trip(model: nn.Module, onnx_model, images: torch.Tensor, labels: torch.Tensor,
               normalization: Normalization | None, *, optimization: str = "all", quantize_bias: bool = False,
               batch_size: int = 500, reference: np.ndarray | None = None, check_model: bool = True) -> dict:
    """Compare ``model`` with its export on ``images`` (see the module's notes on where they differ).

    Args:
        model: the quantized model (fake quantization).
        onnx_model: its export (``ModelProto``, path or bytes).
        images, labels: the evaluation images (raw ``uint8`` when the export has its
            ``normalization``) and labels.
        normalization: the export's input normalization (None: ``images`` are normalized).
        optimization: onnxruntime's graph optimization level (:data:`OPTIMIZATIONS`).
        quantize_bias: let onnxruntime quantize the float biases to int32 (its default; see
            :func:`session`).
        reference: our logits for ``images`` when already computed (:func:`torch_logits`).
        check_model: run ``onnx.checker`` first (off when the caller has).

    Returns:
        ``n``, ``acc_ours``, ``acc_onnx`` (percent), ``acc_diff`` (points), ``agreement`` (argmax,
        a fraction), ``max_abs_diff`` / ``mean_abs_diff`` of the logits, ``logit_scale`` (the
        largest ``|logit|`` of ours), ``images_differing`` (the fraction of images whose logits
        differ by more than ``1e-4 * logit_scale``: those a level flip reached), ``optimization``,
        ``onnxruntime`` (its version), and ``passed`` (accuracy within :data:`ACC_TOLERANCE` and
        agreement at least :data:`MIN_AGREEMENT`).
    """
    ort = require("onnxruntime")
    if check_model:
        checker(onnx_model)
    ref = torch_logits(model, images, normalization, batch_size) if reference is None else reference
    got = onnx_logits(session(onnx_model, optimization, quantize_bias), images, batch_size)
    y = labels.detach().cpu().numpy()
    acc_ours = float((ref.argmax(1) == y).mean() * 100)
    acc_onnx = float((got.argmax(1) == y).mean() * 100)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    diff = np.abs(ref - got)
    scale = float(np.abs(ref).max())
    out = {"n": int(len(y)), "acc_ours": acc_ours, "acc_onnx": acc_onnx, "acc_diff": acc_onnx - acc_ours,
           "agreement": agree, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "images_differing": float((diff.max(axis=1) > 1e-4 * scale).mean()), "logit_scale": scale,
           "optimization": optimization, "quantize_bias": quantize_bias,
           "onnxruntime": ort.__version__}
    out["passed"] = abs(out["acc_diff"]) <= ACC_TOLERANCE + 1e-9 and agree >= MIN_AGREEMENT
    return out


__all__ = ["ACC_TOLERANCE", "MIN_AGREEMENT", "OPTIMIZATIONS", "checker", "onnx_logits", "round_trip", "session",
           "torch_logits"]
