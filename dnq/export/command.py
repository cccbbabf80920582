"""``dnq export``: quantize a trained run with one PTQ setting and write it as an ONNX QDQ model.

The model is quantized exactly as ``dnq ptq`` quantizes it (:func:`dnq.ptq.apply_ptq`: the same
calibration images, seed, ranges and convention; mixed precision through the same allocation),
translated by :func:`dnq.export.to_onnx` with the run's input normalization in the graph, and
written atomically next to a JSON sidecar (``OUT.json``) that records the bits of every layer and
quantizer, the PTQ setting, the convention, the source run's hashes, the file sizes and, with
``check``, the round trip through onnxruntime (:mod:`dnq.export.roundtrip`).

Example:
    >>> from dnq.export.command import export_run
    >>> side = export_run("runs/digits", "digits-w4a4.onnx", bits="W4A4", method="rtn", check=True)  # doctest: +SKIP
    >>> side["check"]["exported"]["agreement"], side["size"]["ratio"]                             # doctest: +SKIP
    (1.0, 0.204)

    The sidecar sits next to the file, and an output that would replace what is not an export is
    refused before any work:

    >>> import os, tempfile
    >>> from pathlib import Path
    >>> sidecar_path(Path("exports/digits-w4a4.onnx")).name
    'digits-w4a4.onnx.json'
    >>> folder = tempfile.mkdtemp()
    >>> check_out(folder, overwrite=False)
    Traceback (most recent call last):
        ...
    dnq.export.errors.ExportError: --out ... is a folder; give a file name such as .../model.onnx
    >>> mine = Path(folder) / "mine.onnx"
    >>> _ = mine.write_bytes(b"a user's file")
    >>> check_out(mine, overwrite=True)
    Traceback (most recent call last):
        ...
    dnq.export.errors.ExportError: ...mine.onnx exists and was not written by dnq export ...; it is not replaced: ...
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from dnq_landscape_common.device import parse_device
from dnq_landscape_common.precision import full_precision

from ..convention import check_convention
from ..convention import describe as describe_convention
from ..data import BatchLoader
from ..io import atomic_write_bytes, atomic_write_json
from ..mixed import OBJECTIVES, allocations, parse_budgets, shared_input_groups
from ..ptq import RTN_CALIB_SIZE, _convention_weight_mode, _sensitivity_entry, apply_ptq
from ..quant import RANGE_METHODS, check_bits, fold_batchnorm, parse_bits
from ..recon import LR_RULES, PAPER_CALIB_SIZE, PTQ_METHODS, RECON_METHODS, default_iters
from ..run import run_dataset
from ..rundir import folder_lock
from ..sensitivity_file import model_hash, read_sensitivity
from ..train import evaluate, load_model
from .errors import ExportError, require
from .onnx_graph import DEFAULT_OPSET, Normalization, build_onnx, check_opset
from .roundtrip import ACC_TOLERANCE, MIN_AGREEMENT, checker, round_trip, torch_logits

SIDECAR_FORMAT = "dnq-export"
WRITTEN_BY = "dnq export"


class CheckFailed(RuntimeError):
    """The round trip missed its thresholds; the files are written and the sidecar records the check."""


def sidecar_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return out.with_name(out.name + ".json")


def _ours(path: Path) -> bool:
    """Whether ``path`` (an existing export) was written by ``dnq export``: its sidecar says so."""
    side = sidecar_path(path)
    try:
        return json.loads(side.read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out, overwrite: bool) -> Path:
    """The output path, refused (before any work) when it would overwrite what is not ours."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    side = sidecar_path(out)
    for p in (out, side):
        if p.exists() and not overwrite:
            raise ExportError(f"{p} exists; pass --overwrite to replace an earlier export, or choose another --out")
    if (out.exists() or side.exists()) and not _ours(out):
        raise ExportError(f"{out if out.exists() else side} exists and was not written by dnq export (no sidecar "
                          f"{side.name} saying so); it is not replaced: choose another --out")
    if not out.parent.exists():
        raise ExportError(f"the folder of --out ({out.parent}) does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write into {out.parent} (permission denied); choose another --out")
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_settings(bits, method, range_method, mixed, objective, abits, first_last_bits, calib_size, iters,
                    recon_batch_size, convention, lr_rule, opset):
    """Everything refused before the run is loaded: one line naming the setting and the fix."""
    if method not in PTQ_METHODS:
        raise ExportError(f"unknown PTQ method {method!r}; valid: {', '.join(PTQ_METHODS)} (one method per export)")
    if range_method not in RANGE_METHODS:
        raise ExportError(f"unknown range method {range_method!r}; valid: {', '.join(RANGE_METHODS)} (one per export)")
    check_convention(convention)
    if lr_rule is not None and lr_rule not in LR_RULES:
        raise ExportError(f"unknown lr_rule {lr_rule!r}; valid: {', '.join(LR_RULES)}")
    check_opset(opset)
    if first_last_bits is not None:
        check_bits(first_last_bits, "first/last layer bits")
    for name, v in (("calib_size", calib_size), ("iters", iters), ("recon_batch_size", recon_batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ExportError(f"{name} must be a positive integer, got {v!r}")
    if mixed is None:
        if bits is None:
            raise ExportError("give the bits to export, e.g. --bits W4A4 (or a mixed-precision budget, --mixed "
                              "avg-bits=3)")
        settings = parse_bits(bits)
        if len(settings) != 1:
            raise ExportError(f"one export is one bit setting; got {bits!r}: run dnq export once per setting")
        return settings[0], None
    if bits is not None:
        raise ExportError("--bits sets uniform bits; with --mixed the weight bits come from the allocation and the "
                          "activation bits from --abits: drop --bits")
    if convention == "paper":
        raise ExportError("mixed precision (--mixed) uses the sensitivity of the dnq convention's symmetric weight "
                          "quantizer; use --convention dnq")
    budgets = parse_budgets(mixed)
    if len(budgets) != 1 or objective not in OBJECTIVES:
        raise ExportError(f"one export is one allocation: give one budget (--mixed avg-bits=3) and one objective "
                          f"(--objective, one of {', '.join(OBJECTIVES)}); got {mixed!r} and {objective!r}")
    check_bits(abits, "activation bits (--abits)")
    return (None, abits), budgets[0]


def _allocation(run_dir: Path, model, budget, objective, abits, range_method, first_last_bits, sensitivity, tie,
                calib, quiet, data_root) -> dict:
    """The mixed-precision allocation, as ``dnq ptq --mixed`` makes it for this budget and objective."""
    mix = {"sensitivity": None if sensitivity is None else Path(sensitivity)}
    entry, where = _sensitivity_entry(run_dir, model, mix, range_method, quiet, data_root)
    tied = shared_input_groups(model, calib[:2]) if tie else None
    (kind, value, obj, alloc), = allocations(entry, [budget], [objective], first_last_bits=first_last_bits,
                                             abits=abits, tied=tied)
    a = alloc.to_dict()
    a["objective_value"] = a.pop("objective")  # the allocation's summed objective; "objective" names it
    return {**a, "kind": kind, "budget": value, "objective": obj, "sensitivity": where, "tied": tied or [],
            "max_bits": max(entry["bits"])}


def export_run(run_dir, out, *, bits: str | None = None, method: str = "rtn", range_method: str = "minmax",
               convention: str = "dnq", lr_rule: str | None = None, weight_mode: str | None = None,
               first_last_bits: int | None = 8, calib_size: int | None = None, iters: int | None = None,
               recon_batch_size: int = 32, mixed: str | None = None, objective: str = "predicted",
               sensitivity=None, abits: int = 4, tie_shared_inputs: bool = False, opset: int = DEFAULT_OPSET,
               check: bool = False, overwrite: bool = False, device: str = "auto", seed: int = 0,
               data: str | None = None, data_root: str | None = None, quiet: bool = False) -> dict:
    """Quantize ``run_dir``'s model with one PTQ setting and write ``out`` (ONNX) and its sidecar.

    Args:
        run_dir: a ``dnq train`` run folder.
        out: the ONNX file to write (its sidecar is ``out`` + ``.json``); an existing export is
            replaced only with ``overwrite``, a file ``dnq export`` did not write never.
        bits: one ``WxAy`` setting (uniform precision); or ``mixed``, one budget
            (``"avg-bits=3"``) allocated for ``objective`` with activations at ``abits``.
        method, range_method, convention, lr_rule, weight_mode, first_last_bits, calib_size,
            iters, recon_batch_size, sensitivity, tie_shared_inputs, seed, data, data_root: as in
            :func:`dnq.ptq.run_ptq` (one method and one range method).
        opset: the ONNX opset (:data:`dnq.export.DEFAULT_OPSET`; 25 stores 2-bit weights as INT2).
        check: run the round trip on the run's test split and record it (:class:`CheckFailed`
            after writing when it misses :data:`dnq.export.roundtrip.ACC_TOLERANCE` or
            :data:`dnq.export.roundtrip.MIN_AGREEMENT`).
        device: where the PTQ runs (``auto``: CUDA when present).
        quiet: no progress bar.

    Returns:
        The sidecar (also written).

    Raises:
        ExportError: a bad setting, an output that would overwrite, a model the exporter cannot
            express (before anything is written); ``MissingDependency`` without onnx/onnxruntime.
        CheckFailed: the round trip missed its thresholds (the files are written).
    """
    t0 = time.perf_counter()
    (wbits, abits_), budget = _check_settings(bits, method, range_method, mixed, objective, abits, first_last_bits,
                                              calib_size, iters, recon_batch_size, convention, lr_rule, opset)
    weight_mode = _convention_weight_mode(convention, weight_mode)
    if budget is not None and weight_mode != "symmetric":
        raise ExportError("mixed precision uses the sensitivity of the symmetric per-channel weight quantizer; use "
                          "--weight-mode symmetric")
    if tie_shared_inputs and budget is None:
        raise ExportError("--tie-shortcuts ties the bits of a mixed-precision allocation; use it with --mixed")
    require("onnx")
    if check:
        require("onnxruntime")
    out = check_out(out, overwrite)
    run_dir = Path(run_dir)
    dev = parse_device(device)
    model, meta = load_model(run_dir, dev)
    if budget is not None and sensitivity is not None:  # a wrong file is refused before any work
        read_sensitivity(sensitivity, model_hash(model))
    ds = run_dataset(meta, data, data_root)
    n_calib = calib_size or (PAPER_CALIB_SIZE if method in RECON_METHODS else RTN_CALIB_SIZE)
    calib = ds.calibration_inputs(n_calib, seed).to(dev)
    alloc = None
    with folder_lock(run_dir, "dnq export"), full_precision():
        if budget is not None:
            alloc = _allocation(run_dir, model, budget, objective, abits_, range_method, first_last_bits, sensitivity,
                                tie_shared_inputs, calib, quiet, data_root)
            wbits = alloc["max_bits"]
        qmodel = apply_ptq(model, method, wbits, abits_, calib, range_method=range_method,
                           first_last_bits=first_last_bits, bits_by_layer=None if alloc is None else alloc["bits"],
                           weight_mode=weight_mode, seed=seed, iters=iters, batch_size=recon_batch_size,
                           progress=not quiet, convention=convention, lr_rule=lr_rule)
    label = f"W{wbits}A{abits_}" if alloc is None else f"{alloc['kind']}={alloc['budget']:g}:{alloc['objective']}"
    norm = Normalization.of_dataset(ds)
    meta_props = {"dnq.method": method, "dnq.bits": label, "dnq.convention": convention,
                  "dnq.source_model_hash": model_hash(model)}
    proto, info = build_onnx(qmodel, calib[:2], opset=opset, normalization=norm, metadata=meta_props)
    data_bytes = proto.SerializeToString()
    if not check:
        checker(data_bytes)  # with check, check_export runs it
    float_proto, _ = build_onnx(fold_batchnorm(model), calib[:2], opset=opset, normalization=norm)
    float_bytes = float_proto.ByteSize()
    side = {
        "written_by": WRITTEN_BY, "format": SIDECAR_FORMAT, "format_version": 1, "onnx": out.name,
        "onnx_sha256": hashlib.sha256(data_bytes).hexdigest(), "opset": opset,
        "source": {"run": str(run_dir), "model_hash": model_hash(model), "model_pt_sha256":
                   _file_sha256(run_dir / "model.pt"), "arch": meta.get("arch"), "data": meta.get("data"),
                   "data_sha256": meta.get("data_sha256")},
        "ptq": {"method": method, "bits": label, "wbits": wbits if alloc is None else alloc.get("avg_bits"),
                "abits": abits_, "range": range_method, "convention": convention,
                "convention_description": describe_convention(convention), "weight_mode": weight_mode,
                "first_last_bits": first_last_bits, "calib_size": len(calib), "calib_seed": seed,
                "fold_bn": True, "recon": _recon_summary(qmodel), "mixed": alloc,
                "iters": (iters or default_iters(dev)) if method in RECON_METHODS else None},
        "input": {"name": info["input"], "dtype": "uint8", "layout": "NCHW",
                  "shape": ["batch", *[int(d) for d in calib.shape[1:]]],
                  "normalization": {"max_value": norm.max_value, "mean": list(norm.mean), "std": list(norm.std),
                                    "formula": "(float(x) / max_value - mean[c]) / std[c], in float32"}},
        "output": {"name": info["output"], "what": "logits (float32)"},
        "layers": info["weights"], "activations": info["activations"],
        "size": _sizes(len(data_bytes), float_bytes, info["weights"]),
        "bias": "float32 (as the fake-quantized model computes); onnxruntime's default optimizations quantize it to "
                "int32 at the accumulator scale (its WeightBiasQuantization pass)",
    }
    side["accuracy"] = _accuracy(qmodel, ds)
    if check:
        side["check"] = check_export(qmodel, data_bytes, ds, norm)
    side["time_s"] = time.perf_counter() - t0
    atomic_write_bytes(out, data_bytes)
    atomic_write_json(sidecar_path(out), side)
    if check and not side["check"]["passed"]:
        c = side["check"]["exported"]
        raise CheckFailed(f"the round trip missed its thresholds (accuracy {c['acc_ours']:.2f}% ours against "
                          f"{c['acc_onnx']:.2f}% onnxruntime, allowed {ACC_TOLERANCE} points; argmax agreement "
                          f"{c['agreement']:.2%}, needed {MIN_AGREEMENT:.1%}); {out} and its sidecar are written")
    return side


def _sizes(onnx_bytes: int, float_bytes: int, weights: list[dict]) -> dict:
    """The file against the float model's, and the stored weights against float32, per bit-width."""
    by_bits: dict = {}
    for w in weights:
        if w["bits"] is not None:
            e = by_bits.setdefault(str(w["bits"]), {"container": w["container"], "weights": 0, "bytes": 0})
            e["weights"] += w["numel"]
            e["bytes"] += w["bytes"]
    for e in by_bits.values():
        e["ratio_to_float32"] = e["bytes"] / (4 * e["weights"])
    return {"onnx_bytes": onnx_bytes, "float_onnx_bytes": float_bytes, "ratio": onnx_bytes / float_bytes,
            "weights_by_bits": by_bits,
            "float_model": "the run's float model with BatchNorm folded, written by the same exporter (float32 "
                           "weights, no quantizers)"}


def _recon_summary(qmodel) -> dict | None:
    recon = getattr(qmodel, "ptq_recon", None)
    return None if recon is None else {k: v for k, v in recon.items() if k != "units"}


def _accuracy(qmodel, ds) -> dict:
    """Our fake-quantized model's test accuracy (percent) on the run's test split."""
    with full_precision():
        loss, acc = evaluate(qmodel, BatchLoader(ds.to(next(qmodel.parameters()).device), 1024, False))
    return {"split": "test", "n": len(ds.y_test), "test_acc": 100.0 * acc, "test_loss": loss}


def check_export(qmodel, onnx_model, ds, norm: Normalization) -> dict:
    """The round trip on the test split: the export as written (gating the check) and under
    onnxruntime's default optimizations (reported; an error there is recorded, not raised)."""
    checker(onnx_model)
    x, y = ds.x_test.cpu(), ds.y_test.cpu()
    ref = torch_logits(qmodel, x, norm)  # ours once, for both sessions
    exported = round_trip(qmodel, onnx_model, x, y, norm, quantize_bias=False, reference=ref, check_model=False)
    try:
        default = round_trip(qmodel, onnx_model, x, y, norm, quantize_bias=True, reference=ref, check_model=False)
    except Exception as e:  # noqa: BLE001 - onnxruntime's optimizer may refuse what its plain kernels run
        default = {"error": " ".join(str(e).split())[:300]}
    return {"split": "test", "exported": exported, "onnxruntime_default": default, "passed": exported["passed"],
            "thresholds": {"accuracy_points": ACC_TOLERANCE, "argmax_agreement": MIN_AGREEMENT},
            "exported_means": "onnxruntime (CPU, every graph optimization on) with the float biases kept as "
                              "exported: the fake-quantized model's computation",
            "onnxruntime_default_means": "onnxruntime's default session, which also quantizes the float biases to "
                                         "int32 at the accumulator scale (input scale x weight scale)"}


__all__ = ["CheckFailed", "check_export", "check_out", "export_run", "sidecar_path"]
