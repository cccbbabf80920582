"""Per-layer quantization sensitivity of a trained model: ``landscape sensitivity RUN``.

This is the meeting layer's side of :mod:`landscape.sensitivity` (it imports :mod:`dnq` for the
quantizer; the file format it writes is :mod:`dnq.sensitivity_file`'s, whose reader is ``dnq ptq
--mixed``, and :func:`run_sensitivity` is the sensitivity provider ``landscape`` registers for it).
For every Conv/Linear layer ``l`` and candidate weight bit-width ``b`` it records:

* ``predicted``: the second-order prediction ``g.mu + (mu^T H_ll mu + Tr(H_ll Sigma))/2`` of the
  loss increase with only layer ``l``'s weights quantized, with ``(mu, Sigma)`` the per-channel mean
  and variance of the layer's own error ``Q_b(W) - W`` (:func:`landscape.layer_sensitivity`;
  block-diagonal, cross-layer terms dropped);
* ``hawq``: HAWQ-V2's ``Tr(H_ll) / n_l * ||Q_b(W_l) - W_l||^2``;
* ``measured``: the loss increase measured with only layer ``l``'s weights quantized at ``b``
  bits, and ``measured_wa``: the same with its input activations quantized at ``b`` bits too
  (asymmetric per tensor, range from the same images with the same range method).

``H``, ``g`` and the losses are those of the training loss (cross-entropy) on ``samples``
non-augmented training images (the run's validation split is never used), in eval mode and
float32. The weight quantizer is :func:`dnq.quant.weight_error`'s (symmetric per output channel,
the given range method) on the unfolded weights: for this quantizer ``Q(f W) = f Q(W)`` per
channel, so the error of the BatchNorm-folded weights PTQ quantizes is the same error seen in
the parameters ``H`` is taken in.

``RUN/sensitivity.json`` holds the model's hash and one entry per setting (bits, samples,
probes, range method, seed); a file written for another model is refused, never overwritten.

Example:
    >>> import math, torch, torch.nn as nn
    >>> from landscape.sensitivity_run import mean_loss
    >>> model = nn.Linear(3, 2)
    >>> _ = nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), (torch.randn(2, 3), torch.tensor([1, 1]))]
    >>> abs(mean_loss(model, data, nn.functional.cross_entropy) - math.log(2)) < 1e-6  # equal logits: log 2
    True
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dnq.data import training_batches
from dnq.errors import SensitivityFileError
from dnq.io import atomic_write_json
from dnq.mixed import count_macs
from dnq.quant import (
    RANGE_METHODS,
    act_qparams,
    execution_order,
    fake_quantize,
    observe_inputs,
    quant_layers,
    quantize_weight,
    weight_error,
)
from dnq.run import run_dataset
from dnq.rundir import folder_lock
from dnq.sensitivity_file import (
    CANDIDATE_BITS,
    FORMAT,
    SENSITIVITY_FILE,
    TABLES,
    VERSION,
    find_entry,
    format_sensitivity_table,
    model_hash,
    new_document,
    parse_bit_list,
    read_sensitivity,
    settings_key,
)
from dnq.train import load_model
from dnq_landscape_common.device import parse_device
from dnq_landscape_common.precision import full_precision

from .hessian import HessianOperator
from .sensitivity import error_moments, layer_sensitivity

__all__ = ["CANDIDATE_BITS", "DEFAULT_MATVECS", "DEFAULT_SAMPLES", "FORMAT", "SENSITIVITY_FILE", "TABLES", "VERSION",
           "SensitivityFileError", "find_entry", "format_sensitivity_table", "mean_loss", "measure_sensitivity",
           "model_hash", "parse_bit_list", "read_sensitivity", "run_sensitivity", "settings_key", "training_batches"]

DEFAULT_SAMPLES = 512
DEFAULT_MATVECS = 64
BATCH = 128


@full_precision()
def mean_loss(model: nn.Module, data, loss_fn) -> float:
    """The sample-weighted mean loss of ``model`` over ``(inputs, targets)`` batches (no gradients,
    float32)."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in data:
            tot += float(loss_fn(model(x), y)) * len(y)
            n += len(y)
    return tot / n


def measure_sensitivity(model: nn.Module, data, bits=CANDIDATE_BITS, *, range_method: str = "minmax",
                        num_matvecs: int = DEFAULT_MATVECS, seed: int = 0, measured: bool = True,
                        loss_fn=nn.functional.cross_entropy, progress: bool = False) -> dict:
    """Every layer's ``predicted``, ``hawq``, ``measured`` and ``measured_wa`` sensitivity at each of
    ``bits`` (see the module doc), with standard errors and the cost in gradient-equivalents.

    Args:
        model: a trained float model (not modified; measured in eval mode).
        data: a list of ``(inputs, targets)`` batches (training images).
        bits: candidate weight bit-widths.
        range_method: the weight (and activation) range method of the quantizer, as in PTQ.
        num_matvecs: Hutchinson probes shared by every layer and bit-width.
        seed: seed of the probes.
        measured: also measure the loss increases (``len(bits) * layers * 2`` evaluations).
        loss_fn: the mean loss.
        progress: progress bars.

    Returns:
        A JSON-ready dict: ``layers`` (name, parameter, weights, MACs per image, position in
        execution order), ``bits``, the four tables ``{layer: {bits: value}}`` with their standard
        errors (``measured`` has none: it is exact on these images), the terms of ``predicted``,
        per-layer traces, the loss, and ``cost`` (products, forms, forward passes, seconds, and
        gradient-equivalents: seconds over the seconds of one gradient on the same data, the
        best of three timings in the same call).
    """
    bits = parse_bit_list(bits)
    if range_method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {range_method!r}; valid: {', '.join(RANGE_METHODS)}")
    data = list(data)
    if not data:
        raise ValueError("no data: give at least one (inputs, targets) batch")
    model = copy.deepcopy(model).eval()  # never touch the caller's model
    layers = dict(quant_layers(model))
    if not layers:
        raise ValueError("the model has no Conv/Linear layer")
    order = execution_order(model, data[0][0])
    macs = count_macs(model, data[0][0][:2])
    params = [f"{n}.weight" for n in order]
    errors = {}
    with torch.no_grad():
        for n, p in zip(order, params):
            w = layers[n].weight
            errors[p] = {b: error_moments(weight_error(w, b, "symmetric", range_method)) for b in bits}
    op = HessianOperator(model, loss_fn, data, params=params)
    t_grad = math.inf
    for _ in range(3):  # best of three: one gradient on a few hundred images is a noisy single timing
        t0 = time.perf_counter()
        op.gradient()
        t_grad = min(t_grad, time.perf_counter() - t0)
    res = layer_sensitivity(op, errors, num_matvecs=num_matvecs, seed=seed, progress=progress)
    by_layer = dict(zip(params, order))

    def rename(table: dict) -> dict:
        return {by_layer[p]: {int(b): float(v) for b, v in per.items()} for p, per in table.items()}

    out = {
        "layers": [{"name": n, "param": p, "numel": layers[n].weight.numel(), "macs": macs.get(n, 0), "order": i}
                   for i, (n, p) in enumerate(zip(order, params))],
        "bits": bits,
        "predicted": rename(res.predicted), "predicted_std_error": rename(res.predicted_std_error),
        "hawq": rename(res.hawq), "hawq_std_error": rename(res.hawq_std_error),
        "terms": {"gradient": rename(res.gradient_term), "mean_curvature": rename(res.mean_curvature_term),
                  "trace": rename(res.trace_term)},
        "layer_trace": {by_layer[p]: v for p, v in res.layer_trace.items()},
        "layer_trace_std_error": {by_layer[p]: v for p, v in res.layer_trace_std_error.items()},
        "loss": res.loss,
    }
    cost = {"gradient_s": t_grad, "curvature_s": res.time_s, "matvecs": res.num_matvecs,
            "quadratic_forms": res.num_quadratic_forms, "gradients": res.num_gradients,
            "curvature_gradient_equivalents": res.time_s / t_grad if t_grad > 0 else math.nan}
    if measured:
        t1 = time.perf_counter()
        out["measured"], out["measured_wa"], passes = _measured(model, layers, order, data, bits, range_method,
                                                                loss_fn, progress)
        t_meas = time.perf_counter() - t1
        cost.update({"measured_s": t_meas, "forward_passes": passes,
                     "measured_gradient_equivalents": t_meas / t_grad if t_grad > 0 else math.nan})
    out["cost"] = cost
    return out


@torch.no_grad()
def _measured(model, layers, order, data, bits, range_method, loss_fn, progress):
    """Loss increases with one layer quantized (weights; weights and input activations)."""
    base = mean_loss(model, data, loss_fn)
    observers, _, _ = observe_inputs(model, [(n, layers[n]) for n in order], (x for x, _ in data),
                                     data[0][0].device)
    w_only: dict = {n: {} for n in order}
    w_act: dict = {n: {} for n in order}
    bar = tqdm(total=len(order) * len(bits) * 2, desc="measured", leave=False, disable=not progress)
    for n in order:
        layer = layers[n]
        saved = layer.weight.detach().clone()
        for b in bits:
            layer.weight.copy_(quantize_weight(saved.float(), b, "symmetric", range_method).to(saved.dtype))
            w_only[n][b] = mean_loss(model, data, loss_fn) - base
            bar.update(1)
            lo, hi = observers[n].range(b, range_method)
            s, z, qmin, qmax = act_qparams(lo, hi, b)
            scale, zp = torch.tensor(s), torch.tensor(z)

            def hook(m, a, scale=scale, zp=zp, qmin=qmin, qmax=qmax):
                return (fake_quantize(a[0], scale.to(a[0]), zp.to(a[0]), qmin, qmax), *a[1:])

            h = layer.register_forward_pre_hook(hook)
            try:
                w_act[n][b] = mean_loss(model, data, loss_fn) - base
            finally:
                h.remove()
            bar.update(1)
        layer.weight.copy_(saved)
    bar.close()
    return w_only, w_act, 1 + 2 * len(order) * len(bits)


def run_sensitivity(run_dir, bits=CANDIDATE_BITS, samples: int = DEFAULT_SAMPLES, *, matvecs: int = DEFAULT_MATVECS,
                    range_method: str = "minmax", seed: int = 0, device: str = "auto", out=None,
                    data_root: str | None = None, quiet: bool = False, recompute: bool = False,
                    lock: bool = True) -> dict:
    """Measure the sensitivity of the final model of a ``dnq train`` run and add it to
    ``RUN/sensitivity.json`` (or ``out``): returns the entry.

    An entry with the same settings already in the file is returned without work, unless
    ``recompute``. A file written for another model is refused. ``lock=False`` is for a caller
    that already holds the folder's lock (``dnq ptq --mixed``).

    Raises:
        SensitivityFileError: the file is corrupt or from another model.
        ValueError: a bad setting; FileNotFoundError: no ``model.pt``.
    """
    bits = parse_bit_list(bits)
    for name, v, lo in (("samples", samples, 1), ("matvecs", matvecs, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if range_method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {range_method!r}; valid: {', '.join(RANGE_METHODS)}")
    run_dir = Path(run_dir)
    dev = parse_device(device)
    model, meta = load_model(run_dir, dev)
    mh = model_hash(model)
    path = Path(out) if out is not None else run_dir / SENSITIVITY_FILE
    doc = read_sensitivity(path, mh) if path.exists() else new_document(mh, str(run_dir), meta.get("arch"))
    settings = {"bits": bits, "samples": samples, "matvecs": matvecs, "range_method": range_method, "seed": seed}
    key = settings_key(settings)
    if key in doc["entries"] and not recompute:
        return doc["entries"][key]
    ds = run_dataset(meta, None, data_root).to(dev)
    data = training_batches(ds, samples, seed, BATCH)
    with folder_lock(path.parent, "landscape sensitivity") if lock else contextlib.nullcontext():
        result = measure_sensitivity(model, data, bits, range_method=range_method, num_matvecs=matvecs, seed=seed,
                                     progress=not quiet)
        n = sum(len(y) for _, y in data)
        entry = {"settings": {**settings, "samples_used": n, "split": "train (validation images excluded)",
                              "loss": "cross_entropy", "weights": "symmetric per output channel",
                              "activations": "asymmetric per tensor (measured_wa only)"},
                 "model_hash": mh, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
        if path.exists():  # re-read under the lock: another process may have added an entry
            doc = read_sensitivity(path, mh)
        doc["entries"][key] = entry
        atomic_write_json(path, doc)
    return entry
