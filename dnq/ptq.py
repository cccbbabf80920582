"""``dnq ptq``: quantize a trained run at several bit-widths and range methods, write ``ptq.json``.

Example:
    >>> from dnq.ptq import run_ptq
    >>> report = run_ptq("runs/example", bits="W8A8,W4A4", ranges="minmax")   # doctest: +SKIP
    >>> report["results"][0]["test_acc"]                                      # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from landscape.precision import full_precision

from .data import BatchLoader, load_dataset
from .io import atomic_write_json
from .quant import RANGE_METHODS, WEIGHT_MODES, parse_bits, quantize
from .train import evaluate, load_model

DEFAULT_BITS = "W8A8,W6A6,W4A4,W3A3,W2A4"


def parse_ranges(spec: str) -> list[str]:
    ranges = [r.strip() for r in spec.split(",") if r.strip()]
    bad = [r for r in ranges if r not in RANGE_METHODS]
    if bad or not ranges:
        raise ValueError(f"unknown range method(s) {bad or spec!r}; valid: {', '.join(RANGE_METHODS)}")
    return ranges


def run_ptq(run_dir, bits: str = DEFAULT_BITS, ranges: str = ",".join(RANGE_METHODS), weight_mode: str = "symmetric",
            first_last_bits: int | None = 8, calib_size: int = 256, fold_bn: bool = True, device: str = "auto",
            seed: int = 0, data_root: str | None = None, quiet: bool = False, write: bool = True) -> dict:
    """Quantize the final model of ``run_dir`` for every (bits, range method) and evaluate it.

    The calibration set is ``calib_size`` non-augmented training images (seeded choice); the
    evaluation is on the test split. Writes ``run_dir/ptq.json`` (atomically) unless ``write`` is
    False, and returns the same dictionary.
    """
    settings = parse_bits(bits)
    range_list = parse_ranges(ranges)
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {weight_mode!r}; valid: {', '.join(WEIGHT_MODES)}")
    run_dir = Path(run_dir)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, meta = load_model(run_dir, dev)
    ds = load_dataset(meta["data"], data_root).to(dev)
    test = BatchLoader(ds, 1024, False)
    calib = ds.calibration_inputs(calib_size, seed)
    results = []
    jobs = [(w, a, r) for (w, a) in settings for r in range_list]
    with full_precision():  # float32 as written: no TF32 on the GPU, no autocast from the caller
        fp_loss, fp_acc = evaluate(model, test)
        for w, a, r in tqdm(jobs, desc="ptq", disable=quiet, leave=False):
            t0 = time.perf_counter()
            qmodel = quantize(model, w, a, calib, weight_mode=weight_mode, range_method=r,
                              first_last_bits=first_last_bits, fold_bn=fold_bn, seed=seed)
            loss, acc = evaluate(qmodel, test)
            results.append({"bits": f"W{w}A{a}", "wbits": w, "abits": a, "range": r, "test_acc": acc,
                            "test_loss": loss, "acc_drop": fp_acc - acc, "loss_increase": loss - fp_loss,
                            "time_s": time.perf_counter() - t0})
    report = {"run": str(run_dir), "fp": {"test_acc": fp_acc, "test_loss": fp_loss},
              "settings": {"weight_mode": weight_mode, "first_last_bits": first_last_bits, "calib_size": calib_size,
                           "fold_bn": fold_bn, "seed": seed, "activations": "asymmetric per tensor",
                           "weights": f"{weight_mode} per output channel"},
              "results": results}
    if write:
        atomic_write_json(run_dir / "ptq.json", report)
    return report


def format_table(report: dict) -> str:
    """A plain-text table of a ptq report: one row per bit setting, one column per range method."""
    ranges = list(dict.fromkeys(r["range"] for r in report["results"]))
    bits = list(dict.fromkeys(r["bits"] for r in report["results"]))
    acc = {(r["bits"], r["range"]): r["test_acc"] for r in report["results"]}
    lines = [f"{'setting':<8}" + "".join(f"{r:>12}" for r in ranges),
             f"{'FP':<8}" + "".join(f"{100 * report['fp']['test_acc']:>11.2f}%" for _ in ranges)]
    for b in bits:
        lines.append(f"{b:<8}" + "".join(f"{100 * acc[(b, r)]:>11.2f}%" for r in ranges))
    return "\n".join(lines)
