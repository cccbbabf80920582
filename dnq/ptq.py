"""``dnq ptq``: quantize a trained run with several PTQ methods, bit-widths and range methods, write ``ptq.json``.

Methods (``methods``, ``--method``; :data:`dnq.recon.PTQ_METHODS`): ``rtn`` (round to nearest),
``rtn+bn`` (the same quantizers with the BatchNorm statistics re-estimated on the calibration
images through the quantized model, see :func:`dnq.quant.quantize`; also added by
``--bn-reestimate``), and the reconstruction methods ``adaround``, ``brecq`` and ``qdrop``
(:func:`dnq.recon.reconstruct`, whose initial ranges are the row's range method). Every
(method, bits, range method) is one row of ``ptq.json``. Calibration sets: 256 images for
``rtn`` / ``rtn+bn`` and 1,024 (the papers') for the reconstruction methods, unless
``calib_size`` gives one size for all. Calibration images come from the training split, never from the
validation split the run held out (its ``model.pt`` metadata ``val_size`` / ``val_seed``; runs
written before these keys existed have none). Accuracy and loss are reported on the validation
split (when there is one) and on the test split.

The quantization convention (``convention``, ``--convention``; :mod:`dnq.convention`): ``dnq``
(activations at every Conv/Linear input, symmetric weights) or ``paper`` (the BRECQ / QDrop
reference code's places and grids, :mod:`dnq.quant_paper`), recorded in ``settings["convention"]``
and in every row.

Mixed precision (``mixed``, ``--mixed avg-bits=3``): per budget and objective, one weight bit-width per
layer chosen by :func:`dnq.mixed.plan` from the run's per-layer sensitivity
(``RUN/sensitivity.json``, :mod:`dnq.sensitivity_file`; measured by ``landscape sensitivity``, which
``dnq ptq --mixed`` runs itself, through the provider ``landscape`` registers, when the file lacks the
range method), recorded in the row's ``mixed``.

Example:
    >>> from dnq.ptq import format_table, run_ptq
    >>> report = run_ptq("runs/example", bits="W8A8,W2A4", ranges="minmax", methods="rtn,rtn+bn")  # doctest: +SKIP
    >>> [(r["bits"], r["method"]) for r in report["results"]]                                    # doctest: +SKIP
    [('W8A8', 'rtn'), ('W8A8', 'rtn+bn'), ('W2A4', 'rtn'), ('W2A4', 'rtn+bn')]
    >>> print(format_table(report))   # a cnn-digits trained 30 epochs with sgd        # doctest: +SKIP
    setting       minmax   minmax+bn
    FP            99.44%      99.44%
    W8A8          99.44%      99.72%
    W2A4          22.50%      89.72%
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch.nn as nn
from tqdm.auto import tqdm

from dnq_landscape_common.device import parse_device
from dnq_landscape_common.precision import full_precision

from .convention import check_convention
from .convention import describe as describe_convention
from .data import BatchLoader
from .io import atomic_write_json
from .mixed import OBJECTIVES, allocations, parse_budgets, shared_input_groups
from .quant import RANGE_METHODS, WEIGHT_MODES, check_bits, parse_bits, ptq_method, quantize
from .quant_paper import quantize_paper
from .recon import (
    DESCRIPTIONS,
    LR_RULES,
    PAPER_CALIB_SIZE,
    PTQ_METHODS,
    RECON_METHODS,
    check_methods,
    default_iters,
    reconstruct,
)
from .run import run_dataset
from .rundir import folder_lock
from .sensitivity_file import (
    SENSITIVITY_FILE,
    find_entry,
    missing_entry_error,
    model_hash,
    read_sensitivity,
    sensitivity_provider,
)
from .train import evaluate, load_model

DEFAULT_BITS = "W8A8,W6A6,W4A4,W3A3,W2A4"
METRICS = ("test_acc", "val_acc", "test_loss", "val_loss")

# the column suffix of each method in format_table
_SUFFIX = {"rtn": "", "rtn+bn": "+bn", **{m: f"+{m}" for m in RECON_METHODS}}
RTN_CALIB_SIZE = 256


def parse_ranges(spec: str) -> list[str]:
    ranges = [r.strip() for r in spec.split(",") if r.strip()]
    bad = [r for r in ranges if r not in RANGE_METHODS]
    if bad or not ranges:
        raise ValueError(f"unknown range method(s) {bad or spec!r}; valid: {', '.join(RANGE_METHODS)}")
    return ranges


def _describe_rounding(fold_bn: bool, calib: str) -> dict:
    folded = "folded into the preceding convolution" if fold_bn else "not folded (float BatchNorm)"
    return {"rtn": f"round-to-nearest weights and activations; BatchNorm with the trained running statistics, {folded}",
            "rtn+bn": f"rtn with every BatchNorm's running statistics re-estimated on the {calib} through the "
                      f"quantized model (quantized weights and activations, BatchNorm in train mode, momentum None, "
                      f"activation ranges as in rtn), then {folded}; BatchNorm not after a convolution stays a float "
                      f"BatchNorm with the re-estimated statistics"}


def run_ptq(run_dir, bits: str | None = None, ranges: str = ",".join(RANGE_METHODS), weight_mode: str | None = None,
            first_last_bits: int | None = 8, calib_size: int | None = None, fold_bn: bool = True,
            device: str = "auto", seed: int = 0, data_root: str | None = None, quiet: bool = False,
            write: bool = True, bn_reestimate: bool = False, methods: str | list | None = None,
            iters: int | None = None, recon_batch_size: int = 32, mixed=None, objectives: str | list = "predicted",
            sensitivity=None, abits: int = 4, tie_shared_inputs: bool = False, data: str | None = None,
            convention: str = "dnq", lr_rule: str | None = None) -> dict:
    """Quantize the final model of ``run_dir`` for every (method, bits, range method) and evaluate it.

    Args:
        run_dir: a run folder written by ``dnq train`` (with ``model.pt``).
        bits: comma-separated ``WxAy`` settings (see :func:`dnq.quant.parse_bits`); default
            :data:`DEFAULT_BITS`, or with ``mixed`` the uniform settings ``W{b}A{abits}`` for every
            candidate bit-width ``b`` of the sensitivity (the uniform line of a Pareto plot).
        ranges: comma-separated range methods (``minmax``, ``percentile``, ``mse``), used for
            weights and activations alike.
        weight_mode: ``"symmetric"`` or ``"asymmetric"`` per-output-channel weight quantizer
            (None: the convention's; the paper convention takes asymmetric only).
        first_last_bits: bits of the first and last layer (``None``: like the rest).
        calib_size: number of calibration images for every method (default: 256 for ``rtn`` and
            ``rtn+bn``, 1,024 for the reconstruction methods): non-augmented images of the training
            split (the validation images excluded), a seeded choice (the smaller set is the first
            images of the larger).
        fold_bn: fold BatchNorm into the preceding convolution.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: seed of the calibration choice and of the activation subsampling.
        data_root: folder of the torchvision datasets.
        quiet: no progress bar.
        write: write ``run_dir/ptq.json`` (atomically).
        bn_reestimate: also evaluate every setting with ``"rtn+bn"`` (adds it to ``methods``).
        methods: comma list (or list) of :data:`dnq.recon.PTQ_METHODS` (default ``"rtn"``).
        iters: steps per block of the reconstruction methods (default
            :func:`dnq.recon.default_iters`: 20,000 on a GPU, 500 on a CPU).
        recon_batch_size: images per reconstruction step (32, the papers').
        mixed: mixed-precision budgets, ``"avg-bits=3"``, ``"avg-bits=2.5,3"``, ``"bytes=20000"``
            or ``"bops=1e9"`` (:func:`dnq.mixed.parse_budgets`; a list of such strings for several
            kinds): every (budget, objective, range, method) adds a row whose per-layer weight bits
            :func:`dnq.mixed.plan` chose; activations at ``abits``, first and last layer at
            ``first_last_bits``.
        objectives: comma list (or list) of :data:`dnq.mixed.OBJECTIVES` (``predicted``, ``hawq``,
            ``measured``) for ``mixed``.
        sensitivity: a sensitivity file (``landscape sensitivity``); default
            ``run_dir/sensitivity.json``, measured now (and written there) when it lacks the
            row's range method. A file of another model is refused.
        abits: activation bits of the allocated layers (``mixed``).
        tie_shared_inputs: give layers that read the same input (a residual block's shortcut
            convolution and its first convolution) the same bits.
        data: the run's dataset at another place (``npz:NEWPATH``, for a file that moved); its
            content is checked against the run's record first (:func:`dnq.run.run_dataset`).
        convention: ``"dnq"`` or ``"paper"`` (:mod:`dnq.convention`): recorded in the report's
            ``settings["convention"]`` (what it means) and in every row.
        lr_rule: the reconstruction's learning-rate rule (:func:`dnq.recon.default_lrs`; None: the
            convention's).

    Returns:
        The report (also written to ``ptq.json``): ``fp`` (``val_acc``, ``val_loss``,
        ``test_acc``, ``test_loss``; the ``val_*`` are None without a validation split),
        ``data`` (split sizes), ``settings`` (everything that defines the quantizers and the
        calibration) and ``results``, one row per (bits, range, method) with ``method`` (and
        ``variant``, the same name, for older readers), ``calib_size``, ``recon`` (the
        reconstruction's settings and per-block losses, ``None`` for rtn),
        ``val_acc``, ``val_loss``, ``test_acc``, ``test_loss``, ``acc_drop`` and ``loss_increase``
        (test split, against FP), ``bn_reestimated`` (number of re-estimated BatchNorm layers)
        and ``time_s``.

    Raises:
        ValueError: a bad setting (the message names the valid values).
        FileNotFoundError: no ``model.pt`` in ``run_dir``.
    """
    budgets = []
    for spec in ([mixed] if isinstance(mixed, str) else list(mixed or [])):
        budgets += parse_budgets(spec)
    objective_list = [o.strip() for o in objectives.split(",")] if isinstance(objectives, str) else list(objectives)
    bad = [o for o in objective_list if o not in OBJECTIVES]
    if budgets and (bad or not objective_list):
        raise ValueError(f"unknown objective(s) {bad or objectives!r}; valid: {', '.join(OBJECTIVES)}")
    check_bits(abits, "activation bits (--abits)")
    settings = parse_bits(bits) if bits is not None else ([] if budgets else parse_bits(DEFAULT_BITS))
    range_list = parse_ranges(ranges)
    weight_mode = _convention_weight_mode(check_convention(convention), weight_mode)
    if budgets and convention == "paper":
        raise ValueError("mixed precision (--mixed) uses the sensitivity of the dnq convention's symmetric weight "
                         "quantizer; use --convention dnq")
    if lr_rule is not None and lr_rule not in LR_RULES:
        raise ValueError(f"unknown lr_rule {lr_rule!r}; valid: {', '.join(LR_RULES)}")
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {weight_mode!r}; valid: {', '.join(WEIGHT_MODES)}")
    if first_last_bits is not None:
        check_bits(first_last_bits, "first/last layer bits")
    if calib_size is not None and (isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1):
        raise ValueError(f"calib_size must be a positive integer (number of calibration images), got {calib_size!r}")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be a positive integer (reconstruction steps per block), got {iters!r}")
    if isinstance(recon_batch_size, bool) or not isinstance(recon_batch_size, int) or recon_batch_size < 1:
        raise ValueError(f"recon_batch_size must be a positive integer, got {recon_batch_size!r}")
    method_list = check_methods("rtn" if methods is None else methods)
    if ptq_method(bn_reestimate) == "rtn+bn" and "rtn+bn" not in method_list:
        method_list.insert(method_list.index("rtn") + 1 if "rtn" in method_list else 0, "rtn+bn")
    run_dir = Path(run_dir)
    dev = parse_device(device)
    loaded = load_model(run_dir, dev)  # a damaged model.pt is refused before anything is written
    _check_recon_settings(method_list, weight_mode, fold_bn, convention)
    if budgets and weight_mode != "symmetric":
        raise ValueError("mixed precision uses the sensitivity of the symmetric per-channel weight quantizer; use "
                         "--weight-mode symmetric")
    recon = {"iters": default_iters(dev) if iters is None else iters, "batch_size": recon_batch_size,
             "convention": convention, "lr_rule": lr_rule}
    mix = None
    if budgets:
        mix = {"budgets": budgets, "objectives": objective_list, "abits": abits, "tie": tie_shared_inputs,
               "sensitivity": None if sensitivity is None else Path(sensitivity), "uniform": bits is None}
        if sensitivity is not None:  # a wrong file is refused before any work
            read_sensitivity(sensitivity, model_hash(loaded[0]))
    ds = run_dataset(loaded[1], data, data_root)  # a missing or foreign dataset is refused before any work
    args = (run_dir, loaded, settings, range_list, method_list, weight_mode, first_last_bits, calib_size, fold_bn, seed,
            data_root, quiet, recon, mix, ds)
    if not write:
        return _run_ptq(*args)
    _check_writable(run_dir)  # before the work, not after it
    with folder_lock(run_dir, "dnq ptq"):
        report = _run_ptq(*args)
        atomic_write_json(run_dir / "ptq.json", report)
    return report


def _convention_weight_mode(convention: str, weight_mode: str | None) -> str:
    """The weight grid of a convention (dnq: symmetric unless asked; paper: asymmetric only)."""
    if convention == "paper":
        if weight_mode not in (None, "asymmetric"):
            raise ValueError(f"the paper convention quantizes weights asymmetric per channel on 2^b levels; drop "
                             f"--weight-mode {weight_mode} or use --convention dnq")
        return "asymmetric"
    return "symmetric" if weight_mode is None else weight_mode


def _check_recon_settings(methods, weight_mode: str, fold_bn: bool, convention: str = "dnq") -> None:
    """Refuse settings the reconstruction methods do not take (they fold BatchNorm, and quantize
    weights symmetric per channel under the dnq convention, asymmetric under the paper one)."""
    if not fold_bn and any(v in RECON_METHODS for v in methods):
        raise ValueError("the reconstruction methods fold BatchNorm first (as the papers do); drop --no-fold-bn or "
                         "use rtn / rtn+bn only")
    if convention == "dnq" and weight_mode != "symmetric" and any(v in RECON_METHODS for v in methods):
        raise ValueError("the reconstruction methods quantize weights symmetric per channel; use --weight-mode "
                         "symmetric, or rtn / rtn+bn only")


def apply_ptq(model: nn.Module, method: str, wbits: int, abits: int, calib, *, range_method: str = "minmax",
              first_last_bits: int | None = 8, bits_by_layer: dict | None = None, weight_mode: str | None = None,
              fold_bn: bool = True, seed: int = 0, iters: int | None = None, batch_size: int = 32,
              progress: bool = False, convention: str = "dnq", lr_rule: str | None = None) -> nn.Module:
    """One PTQ method on ``model`` (not modified): the one dispatch behind ``dnq ptq`` and the study.

    ``rtn`` and ``rtn+bn`` are :func:`dnq.quant.quantize` (``rtn+bn`` re-estimates BatchNorm on
    ``calib`` through the quantized model); ``adaround``, ``brecq`` and ``qdrop`` are
    :func:`dnq.recon.reconstruct` (``iters`` steps per block, ``batch_size`` images per step;
    they fold BatchNorm and quantize weights symmetric per channel, as the papers do, and refuse
    another ``weight_mode`` or ``fold_bn=False``).

    Args:
        model: the float model.
        method: one of :data:`dnq.recon.PTQ_METHODS`.
        wbits, abits: weight and activation bits.
        calib: calibration images (a tensor).
        range_method, first_last_bits, bits_by_layer, seed: as in :func:`dnq.quant.quantize`.

    Returns:
        The quantized copy (with ``ptq_method``, ``ptq_bn_reestimated`` and, for the
        reconstruction methods, ``ptq_recon``).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
        >>> q = apply_ptq(model, "rtn", 4, 4, torch.randn(16, 1, 8, 8))
        >>> q.ptq_method, q is model
        ('rtn', False)
    """
    weight_mode = _convention_weight_mode(check_convention(convention), weight_mode)
    if method in RECON_METHODS:
        _check_recon_settings([method], weight_mode, fold_bn, convention)
        return reconstruct(model, wbits, abits, calib, method, iters=iters, batch_size=batch_size,
                           first_last_bits=first_last_bits, range_method=range_method, seed=seed, progress=progress,
                           bits_by_layer=bits_by_layer, convention=convention, lr_rule=lr_rule)
    if method not in ("rtn", "rtn+bn"):
        raise ValueError(f"unknown PTQ method {method!r}; valid: {', '.join(PTQ_METHODS)}")
    if convention == "paper":
        return quantize_paper(model, wbits, abits, calib, range_method=range_method, first_last_bits=first_last_bits,
                              fold_bn=fold_bn, seed=seed, bn_reestimate=method == "rtn+bn", bits_by_layer=bits_by_layer)
    q = quantize(model, wbits, abits, calib, weight_mode=weight_mode, range_method=range_method,
                 first_last_bits=first_last_bits, fold_bn=fold_bn, seed=seed, bn_reestimate=method == "rtn+bn",
                 bits_by_layer=bits_by_layer)
    q.ptq_convention = "dnq"
    return q


def _check_writable(run_dir: Path) -> None:
    """Fail now, not after the quantization, when ``ptq.json`` cannot be written."""
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".ptq-check.", suffix=".tmp"):
            pass
    except OSError as e:
        raise PermissionError(e.errno, f"cannot write ptq.json into {run_dir} ({e.strerror})", str(run_dir)) from None


def _sensitivity_entry(run_dir: Path, model, mix: dict, range_method: str, quiet: bool, data_root) -> tuple[dict, str]:
    """The sensitivity entry for ``range_method``: from ``mix["sensitivity"]`` (which must have it),
    else from ``run_dir/sensitivity.json``; when that lacks it, measured now and added there by the
    registered sensitivity provider (:func:`dnq.sensitivity_file.sensitivity_provider`: ``landscape``'s),
    or, without one, refused with the command that measures it."""
    given = mix["sensitivity"]
    path = given if given is not None else run_dir / SENSITIVITY_FILE
    mh = model_hash(model)
    entry = find_entry(read_sensitivity(path, mh), range_method) if path.exists() else None
    if entry is None:
        if given is not None:
            raise ValueError(f"{given} has no entry for range method {range_method!r}; run `landscape sensitivity "
                             f"{run_dir} --range {range_method} --out {given}` or drop --sensitivity")
        provider = sensitivity_provider()
        if provider is None:
            raise missing_entry_error(run_dir, range_method)
        entry = provider(run_dir, range_method=range_method, device=str(next(model.parameters()).device), out=path,
                         quiet=quiet, data_root=data_root, lock=False)
    return entry, str(path)


def _run_ptq(run_dir, loaded, settings, range_list, method_list, weight_mode, first_last_bits, calib_size, fold_bn,
             seed, data_root, quiet, recon, mix, ds) -> dict:
    model, meta = loaded
    dev = next(model.parameters()).device
    val_seed = int(meta.get("val_seed") or 0)
    ds = ds.to(dev)
    test = BatchLoader(ds, 1024, False)
    val = BatchLoader(ds, 1024, False, split="val") if ds.val_size else None
    sizes = {v: calib_size or (PAPER_CALIB_SIZE if v in RECON_METHODS else RTN_CALIB_SIZE) for v in method_list}
    calib_all = ds.calibration_inputs(max(sizes.values()), seed)  # seeded: a smaller set is a prefix of it
    calib_of = {v: calib_all[:n] for v, n in sizes.items()}
    calib_from = f"training split ({len(ds.x_train)} images; the {ds.val_size} validation images excluded)"

    def scores(m) -> dict:
        vl, va = evaluate(m, val) if val is not None else (None, None)
        tl, ta = evaluate(m, test)
        return {"val_acc": va, "val_loss": vl, "test_acc": ta, "test_loss": tl}

    results = []
    jobs = [(f"W{w}A{a}", w, a, r, v, None) for (w, a) in settings for r in range_list for v in method_list]
    sens_files: dict = {}
    if mix is not None:
        tied = shared_input_groups(model, calib_all[:2]) if mix["tie"] else None
        for r in range_list:
            entry, where = _sensitivity_entry(run_dir, model, mix, r, quiet, data_root)
            sens_files[r] = {"file": where, "settings": entry["settings"]}
            if mix["uniform"]:  # the uniform line at the candidate bit-widths, same activations
                jobs += [(f"W{b}A{mix['abits']}", b, mix["abits"], r, v, None) for b in entry["bits"]
                         if (b, mix["abits"]) not in settings for v in method_list]
            for kind, budget, obj, alloc in allocations(entry, mix["budgets"], mix["objectives"],
                                                        first_last_bits=first_last_bits, abits=mix["abits"], tied=tied):
                label = f"{kind}={budget:g}:{obj}"
                info = {"objective": obj, "kind": kind, "budget": budget, "sensitivity": where,
                        "tied": tied or [], **alloc.to_dict()}
                jobs += [(label, max(entry["bits"]), mix["abits"], r, v, info) for v in method_list]
    with full_precision():  # float32 as written: no TF32 on the GPU, no autocast from the caller
        fp = scores(model)
        for label, w, a, r, v, info in tqdm(jobs, desc="ptq", disable=quiet, leave=False):
            t0 = time.perf_counter()
            per_layer = None if info is None else info["bits"]
            qmodel = apply_ptq(model, v, w, a, calib_of[v], range_method=r, first_last_bits=first_last_bits,
                               bits_by_layer=per_layer, weight_mode=weight_mode, fold_bn=fold_bn, seed=seed,
                               iters=recon["iters"], batch_size=recon["batch_size"], progress=not quiet,
                               convention=recon["convention"], lr_rule=recon["lr_rule"])
            s = scores(qmodel)
            results.append({"bits": label, "wbits": w if info is None else info["avg_bits"], "abits": a, "range": r,
                            "method": v, "variant": qmodel.ptq_method, **s, "acc_drop": fp["test_acc"] - s["test_acc"],
                            "loss_increase": s["test_loss"] - fp["test_loss"], "calib_size": len(calib_of[v]),
                            "bn_reestimated": len(qmodel.ptq_bn_reestimated), "mixed": info,
                            "recon": getattr(qmodel, "ptq_recon", None), "convention": recon["convention"],
                            "sites": getattr(qmodel, "ptq_sites", None), "time_s": time.perf_counter() - t0})
    flb = ("same as the other layers" if first_last_bits is None
           else f"{first_last_bits} bits (weights and input activations)")
    report = {
        "run": str(run_dir),
        "fp": fp,
        "data": {"dataset": meta["data"], "train_size": len(ds.x_train), "val_size": ds.val_size, "val_seed": val_seed,
                 "test_size": len(ds.x_test), "calibration": "train"},
        "settings": {
            "convention": describe_convention(recon["convention"]),
            "bits": list(dict.fromkeys(j[0] for j in jobs if j[5] is None)),
            "weights": f"{weight_mode} uniform, per output channel, W bits of each setting "
                       + ("(narrow signed grid, zero point 0)" if weight_mode == "symmetric"
                          else "(zero point per channel)"),
            "weight_mode": weight_mode,
            "weight_granularity": "per output channel",
            "activations": describe_convention(recon["convention"])["activations"] + ", A bits of each setting",
            "ranges": range_list,
            "range_method": "applies to weights (per channel) and activations (per tensor, on the float model)",
            "first_last_bits": first_last_bits,
            "first_last": f"first and last Conv/Linear layer in execution order: {flb}",
            "calib_size": (len(calib_of[method_list[0]]) if len({len(c) for c in calib_of.values()}) == 1 else None),
            "calib_sizes": {v: len(c) for v, c in calib_of.items()},
            "calib_size_requested": calib_size,
            "calib_split": calib_from,
            "calib_seed": seed,
            "fold_bn": fold_bn,
            "bn_reestimate": "rtn+bn" in method_list,
            "methods": method_list,
            "variants": {v: _describe(v, fold_bn, len(calib_of[v]), recon) for v in method_list},
            # the values used (learning rates, regularizer, drop probability) are in each row's "recon"
            "recon": ({**recon,
                       "lr_rule": recon["lr_rule"] or ("paper" if recon["convention"] == "paper" else "scaled"),
                       "lr_rules": {"paper": "the papers' fixed rates: rounding 1e-3, step sizes 4e-5 (qdrop) or "
                                             "4e-4 (brecq's activation stage, a quarter of the steps)",
                                    "scaled": "those times 20000/steps (brecq's activation stage 5000/its steps; under "
                                              "the dnq convention 4e-5 x 20000/its steps), at most 100x"},
                       "init_ranges": "the row's range method"}
                      if any(v in RECON_METHODS for v in method_list) else None),
            "mixed": (None if mix is None else {
                "budgets": [f"{k}={b:g}" for k, b in mix["budgets"]], "objectives": mix["objectives"],
                "abits": mix["abits"], "tie_shared_inputs": mix["tie"], "sensitivity": sens_files,
                "rule": "one weight bit-width per layer from the sensitivity's candidates minimising the summed "
                        "objective within the budget (scipy.optimize.milp); avg-bits counts the allocated layers "
                        "(first/last excluded), bytes and bops every quantized layer; first and last layer at "
                        "first_last_bits"}),
            "seed": seed,
            "eval_splits": ["val", "test"] if val is not None else ["test"],
        },
        "results": results,
    }
    return report


def _describe(method: str, fold_bn: bool, n_calib: int, recon: dict) -> str:
    if method in ("rtn", "rtn+bn"):
        return _describe_rounding(fold_bn, f"{n_calib} calibration images")[method]
    what = DESCRIPTIONS[method]
    return (f"{what}; BatchNorm folded first; {recon['iters']} steps per block, batch {recon['batch_size']}, "
            f"{n_calib} calibration images; initial ranges from the row's range method; "
            f"{recon['convention']} convention")


def _column(r: dict) -> str:
    # rows of older ptq.json files have no method (and the oldest no variant): rtn
    return r["range"] + _SUFFIX[r.get("method", r.get("variant", "rtn"))]


def format_table(report: dict, metric: str = "test_acc") -> str:
    """A plain-text table of a ptq report: one row per bit setting, one column per range method
    and method (``minmax`` for ``"rtn"``, ``minmax+bn`` for ``"rtn+bn"``, ``mse+qdrop`` for
    QDrop with MSE initial ranges; never two methods in one column).

    Args:
        report: a dictionary from :func:`run_ptq` (or a loaded ``ptq.json``).
        metric: ``"test_acc"`` (default), ``"val_acc"`` (percentages), ``"test_loss"`` or
            ``"val_loss"``; a missing value prints as ``n/a``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    cols = list(dict.fromkeys(_column(r) for r in report["results"]))
    bits = list(dict.fromkeys(r["bits"] for r in report["results"]))
    val = {(r["bits"], _column(r)): r.get(metric) for r in report["results"]}
    width = max([12] + [len(c) + 2 for c in cols])
    w0 = max([8] + [len(b) + 2 for b in bits])

    def cell(v) -> str:
        if v is None:
            return f"{'n/a':>{width}}"
        return f"{100 * v:>{width - 1}.2f}%" if metric.endswith("_acc") else f"{v:>{width}.4f}"

    lines = [f"{'setting':<{w0}}" + "".join(f"{c:>{width}}" for c in cols),
             f"{'FP':<{w0}}" + "".join(cell(report["fp"].get(metric)) for _ in cols)]
    for b in bits:
        lines.append(f"{b:<{w0}}" + "".join(cell(val.get((b, c))) for c in cols))
    return "\n".join(lines)
