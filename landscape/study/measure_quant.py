"""The quantization measurements of one trained model: float accuracy (``fp``), PTQ at each
bit-width with each PTQ method (``ptq:<bits>``, ``ptq+bn:<bits>``, ``ptq+<method>:<bits>``), the
per-layer sensitivity (``sensitivity:<range>``) and a mixed-precision allocation's accuracy
(``mixed+<method>:...``).

Each is a function of the model's :class:`~landscape.study.context.MeasureContext` and its key
(:mod:`~landscape.study.keys`), and returns the value recorded.

Example:
    >>> import torch, torch.nn as nn
    >>> from dnq.data import load_dataset
    >>> from landscape.study.context import MeasureContext
    >>> from landscape.study.keys import AccuracyKey, RoundingPTQKey
    >>> ds = load_dataset("digits", val_size=100)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> ctx = MeasureContext(model, ds, hdata=[])
    >>> sorted(fp(ctx, AccuracyKey(splits=("val", "test"))))
    ['test_acc', 'test_loss', 'val_acc', 'val_loss']
    >>> key = RoundingPTQKey(bits="W4A4", method="rtn", seed=0, calib_size=32, first_last_bits=8,
    ...                      range="minmax", bits_by_layer=None)
    >>> r = ptq(ctx, key)
    >>> r["variant"], r["convention"]
    ('rtn', 'dnq')
"""

from __future__ import annotations

import torch.nn as nn

from dnq.convention import describe
from dnq.data import BatchLoader
from dnq.ptq import apply_ptq
from dnq.quant import parse_bits
from dnq.train import evaluate

from ..sensitivity_run import measure_sensitivity
from .context import MeasureContext
from .keys import AccuracyKey, MixedKey, ReconPTQKey, RoundingPTQKey, SensitivityKey

__all__ = ["accuracy", "fp", "mixed", "ptq", "sensitivity"]


def accuracy(ctx: MeasureContext, model: nn.Module, splits=("val", "test")) -> dict:
    """Accuracy and loss of ``model`` on the validation split (None without one) and on the test
    split of the context's dataset."""
    out = {}
    for split in splits:
        if split == "val" and not ctx.ds.val_size:
            out["val_loss"] = out["val_acc"] = None
            continue
        out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(model, BatchLoader(ctx.ds, 1024, False, split=split))
    return out


def fp(ctx: MeasureContext, key: AccuracyKey) -> dict:
    """``fp``: the float model's accuracy and loss on ``key.splits``."""
    return accuracy(ctx, ctx.model, key.splits)


def ptq(ctx: MeasureContext, key: RoundingPTQKey | ReconPTQKey) -> dict:
    """The study's PTQ (:data:`~landscape.study.presets.DEFAULT_PTQ`) at ``key.bits`` with one
    method (:func:`dnq.ptq.apply_ptq`): ``rtn``, ``rtn+bn`` (BatchNorm statistics re-estimated on
    the calibration images through the quantized model) or a reconstruction method (seeded with
    the instruments' seed, its learning rates by ``key.lr_rule``); ``key.bits_by_layer``:
    mixed-precision weight bits; ``key.convention``: the quantization convention
    (:mod:`dnq.convention`), recorded with its description (``convention``,
    ``convention_details``)."""
    (w, a), = parse_bits(key.bits)
    per_layer = None if key.bits_by_layer is None else dict(key.bits_by_layer)
    calib = ctx.ds.calibration_inputs(key.calib_size, key.seed)
    recon = isinstance(key, ReconPTQKey)
    q = apply_ptq(ctx.model, key.method, w, a, calib, range_method=key.range, first_last_bits=key.first_last_bits,
                  bits_by_layer=per_layer, seed=key.seed, iters=key.iters if recon else None,
                  batch_size=key.batch_size if recon else 32, progress=ctx.progress, convention=key.convention,
                  lr_rule=key.lr_rule if recon else None)
    out = {**accuracy(ctx, q), "variant": key.method,  # "variant": the record's name of the PTQ method
           "convention": key.convention, "convention_details": describe(key.convention)}
    if recon:
        info = q.ptq_recon
        units = [{k: u[k] for k in ("unit", "stage", "loss_before", "loss_after", "time_s")} for u in info["units"]]
        out.update({"calib_size": len(calib), "recon_iters": key.iters, "recon_time_s": info["time_s"],
                    "recon_units": units, "recon_lr_rule": info.get("lr_rule", key.lr_rule),
                    "recon_lrs": {"weight_lr": info.get("weight_lr"), "act_lr": info.get("act_lr")}})
    return out


def sensitivity(ctx: MeasureContext, key: SensitivityKey) -> dict:
    """``sensitivity:<range>``: every layer's sensitivity at the candidate bits on the curvature
    images (:func:`landscape.sensitivity_run.measure_sensitivity`)."""
    return measure_sensitivity(ctx.model, ctx.hdata, list(key.bits), range_method=key.range,
                               num_matvecs=key.matvecs, seed=key.seed, progress=ctx.progress)


def mixed(ctx: MeasureContext, key: MixedKey, alloc) -> dict:
    """``mixed+<method>:<kind>=<budget>:<objective>``: the accuracy of the PTQ of the allocation
    ``alloc`` (:class:`dnq.mixed.Allocation`, whose bits ``key.ptq.bits_by_layer`` holds), with the
    objective and the allocation."""
    out = ptq(ctx, key.ptq)
    return {**out, "objective": key.objective, "allocation": alloc.to_dict()}
