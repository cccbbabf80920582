"""The ``dnq`` command: ``dnq train``, ``dnq ptq`` and ``dnq export``.

Every error a user can cause is one line on stderr and exit code 2
(:func:`dnq_landscape_common.cli.guarded`); ``--debug`` or ``DNQ_DEBUG=1`` shows the traceback.

Example:
    >>> import sys
    >>> from dnq.cli import main
    >>> saved, sys.stderr = sys.stderr, sys.stdout  # show stderr here
    >>> main(["train", "--out", "unused", "--epochs", "0"])
    dnq train: error: epochs must be >= 1, got 0 (0 would save an untrained model)
    2
    >>> main(["ptq", "no/such/run"])
    dnq ptq: error: no/such/run does not exist; give the folder of a trained run (the --out of `dnq train`)
    2
    >>> sys.stderr = saved
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dnq_landscape_common.cli import OneLineParser, UsageError, debug_requested, guarded
from dnq_landscape_common.distributed import exit_distributed

from .convention import CONVENTIONS
from .data import DATASET_NAMES
from .export.command import CheckFailed, export_run, sidecar_path
from .export.onnx_graph import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from .export.report import format_export
from .methods import METHODS
from .models import MODELS
from .ptq import format_table, run_ptq
from .quant import RANGE_METHODS, WEIGHT_MODES
from .recon import LR_RULES, PTQ_METHODS
from .train import TrainConfig, train


def _opt_bits(s: str) -> int | None:
    """A bit-width, or ``none``/``same``/``0`` for none."""
    if s.lower() in ("none", "same", "0"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a bit-width: give an integer 2..8, or 'none'") from None


def _val_size(s: str):
    """``auto``, ``none``/``0``, a fraction (``0.2``) or a count (``5000``)."""
    low = s.lower()
    if low == "auto":
        return "auto"
    if low in ("none", "0"):
        return 0
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--val-size takes auto, none, a fraction like 0.2 or a count like 5000; "
                                         f"got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(prog="dnq", description="Quantization-ready training (DNQ) and simple PTQ.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help=f"train a model with {', '.join(METHODS)}",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", default=d.data, help=f"dataset: {', '.join(DATASET_NAMES)}")
    t.add_argument("--model", default=d.model, help=f"model: {', '.join(MODELS)}")
    t.add_argument("--method", default=d.method, help=f"method: {', '.join(METHODS)}")
    t.add_argument("--out", required=True, help="run folder (created; never overwritten without --overwrite)")
    t.add_argument("--wbits", type=int, default=d.wbits, help="target weight bits of the DNQ noise (2..8)")
    t.add_argument("--abits", type=int, default=d.abits, help="target activation bits of the DNQ noise (2..8)")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (all processes)")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--momentum", type=float, default=d.momentum, help="Nesterov momentum")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--lr-warmup-epochs", type=int, default=d.lr_warmup_epochs,
                   help="linear LR warm-up before the cosine")
    t.add_argument("--lambda-max", type=float, default=d.lambda_max, help="noise strength after the ramp")
    t.add_argument("--lambda-start", type=int, default=d.lambda_start, help="epoch at which the noise starts")
    t.add_argument("--lambda-warmup", type=int, default=d.lambda_warmup,
                   help="epochs of the linear ramp to lambda-max (default: a quarter of the epochs; 0: no ramp)")
    t.add_argument("--ema-beta", type=float, default=d.ema_beta, help="EMA of the error statistics across epochs")
    t.add_argument("--temperature", type=float, default=d.temperature, help="salience softmax temperature T")
    t.add_argument("--act-rho", type=float, default=d.act_rho, help="activation-noise injection rate rho")
    t.add_argument("--first-last-bits", type=_opt_bits, default=d.first_last_bits,
                   help="bits the PTQ gives the first and last layer (as in dnq ptq); their noise statistics are "
                        "taken at these bits ('none': like every other layer)")
    t.add_argument("--noise-first-last-bits", type=_opt_bits, default=d.noise_first_last_bits,
                   help="override the bits of the first/last layer's noise statistics (default: --first-last-bits)")
    t.add_argument("--act-sampler", default=d.act_sampler, choices=("auto", "fresh", "table"),
                   help="activation-noise random numbers: fresh per call, or slices of a per-epoch table "
                        "(auto: table on CPU, fresh on CUDA)")
    t.add_argument("--calib-size", type=int, default=d.calib_size, help="calibration samples for activation statistics")
    t.add_argument("--sam-rho", type=float, default=d.sam_rho, help="SAM neighbourhood radius")
    t.add_argument("--swa-start", type=float, default=d.swa_start,
                   help="enable SWA over the last part of training, from this fraction of the epochs (e.g. 0.75)")
    t.add_argument("--bn-recompute", action=argparse.BooleanOptionalAction, default=d.bn_recompute,
                   help="recompute BatchNorm statistics on the clean final weights over one pass of the training "
                        "loader (every method alike); --no-bn-recompute keeps those accumulated in training")
    t.add_argument("--val-size", type=_val_size, default=d.val_size,
                   help="validation images held out of training: auto (digits 20%%, else 10%% up to 5000), a "
                        "fraction, a count, or none")
    t.add_argument("--val-seed", type=int, default=d.val_seed, help="seed of the validation split (not the run seed)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--data-root", default=d.data_root, help="folder of the torchvision datasets (default ./data)")
    t.add_argument("--download", action="store_true", help="allow downloading CIFAR into --data-root")
    t.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d.amp,
                   help="bf16 autocast (default: on CUDA only; --amp forces it on the CPU too, --no-amp off)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="channels_last memory format for model and batches (default: on CUDA only)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (the noise hooks compile too)")
    t.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=d.cuda_graph,
                   help="capture the whole training step (batch, forward, backward, noise, SAM's two passes, "
                        "optimizer) in one CUDA graph and replay it (default: on CUDA wherever it applies; where it "
                        "cannot, one line says why and the step runs eagerly); --no-cuda-graph: every step eagerly")
    t.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DNQ_DEBUG=1)")

    q = sub.add_parser("ptq", help="post-training quantization of a finished run; writes RUN/ptq.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("run", help="run folder written by dnq train")
    q.add_argument("--bits", default=None, help="comma-separated WxAy settings (2..8 bits); default W8A8,W6A6,W4A4,"
                   "W3A3,W2A4, or with --mixed the uniform W{b}A{abits} at the sensitivity's candidate bits")
    q.add_argument("--range", dest="ranges", default=",".join(RANGE_METHODS),
                   help=f"comma-separated clipping-range methods: {', '.join(RANGE_METHODS)}")
    q.add_argument("--convention", default="dnq", choices=CONVENTIONS,
                   help="quantization convention: dnq (this toolkit's: activations at every Conv/Linear input, "
                        "symmetric weights) or paper (the BRECQ/QDrop reference code's: activations at layer and "
                        "block outputs, asymmetric weights on 2^b levels, QDrop's mixing, the papers' learning rates)")
    q.add_argument("--lr-rule", default=None, choices=LR_RULES,
                   help="reconstruction learning rates: paper (fixed) or scaled (times 20000/steps); default: the "
                        "convention's (dnq: scaled, paper: paper)")
    q.add_argument("--weight-mode", default=None, choices=WEIGHT_MODES,
                   help="per-channel weight grid (default: the convention's; dnq: symmetric, paper: asymmetric)")
    q.add_argument("--first-last-bits", type=_opt_bits, default=8,
                   help="bits of the first and last layer ('none' quantizes them like the rest)")
    q.add_argument("--method", dest="methods", default="rtn",
                   help="comma-separated PTQ methods: rtn, rtn+bn, adaround, brecq, qdrop")
    q.add_argument("--calib-size", type=int, default=None,
                   help="calibration training images for every method (default: 256 for rtn and rtn+bn, 1024 for "
                        "adaround, brecq and qdrop)")
    q.add_argument("--iters", type=int, default=None,
                   help="reconstruction steps per block (default: 20000 on a GPU, 500 on a CPU)")
    q.add_argument("--recon-batch-size", type=int, default=32, help="images per reconstruction step")
    q.add_argument("--no-fold-bn", dest="fold_bn", action="store_false", help="do not fold BatchNorm into convolutions")
    q.add_argument("--bn-reestimate", action="store_true",
                   help="also evaluate every setting with BatchNorm statistics re-estimated on the calibration images "
                        "through the quantized model, then folded (variant rtn+bn, columns RANGE+bn)")
    q.add_argument("--mixed", action="append", default=None, metavar="KIND=VALUE[,VALUE]",
                   help="mixed precision within a budget: avg-bits=3 (average weight bits of the allocated layers), "
                        "bytes=N (all quantized weights), bops=N (weight x activation bits x MACs); several values "
                        "comma-separated (avg-bits=2.5,3), repeatable")
    q.add_argument("--objective", default="predicted",
                   help="comma-separated sensitivities the allocation minimises: predicted (second order, "
                        "Tr(H Sigma)), hawq (HAWQ-V2 trace proxy), measured (loss with one layer quantized)")
    q.add_argument("--sensitivity", default=None,
                   help="sensitivity file from `landscape sensitivity` (default RUN/sensitivity.json, measured now "
                        "when missing)")
    q.add_argument("--abits", type=int, default=4, help="activation bits of the allocated layers with --mixed")
    q.add_argument("--tie-shortcuts", action="store_true",
                   help="with --mixed, layers reading the same input (a block's shortcut and first convolution) "
                        "get the same bits")
    q.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data", default=None, metavar="npz:PATH",
                   help="the run's dataset at another place (a file that moved); its content is checked against "
                        "the run's record")
    q.add_argument("--data-root", default=None, help="folder of the torchvision datasets (default: the run's)")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DNQ_DEBUG=1)")
    _export_parser(sub)
    return p


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="quantize a finished run with one PTQ setting and write it as an ONNX QDQ model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run", help="run folder written by dnq train")
    e.add_argument("--out", required=True, help="the ONNX file to write (and OUT.json, its sidecar); an earlier "
                   "export is replaced only with --overwrite, a file dnq export did not write never")
    e.add_argument("--bits", default=None, help="one WxAy setting, e.g. W4A4 (or --mixed)")
    e.add_argument("--method", default="rtn", choices=PTQ_METHODS, help="the PTQ method")
    e.add_argument("--range", dest="range_method", default="minmax", choices=RANGE_METHODS,
                   help="clipping-range method of weights and activations")
    e.add_argument("--convention", default="dnq", choices=CONVENTIONS, help="quantization convention (as dnq ptq)")
    e.add_argument("--lr-rule", default=None, choices=LR_RULES, help="reconstruction learning rates (as dnq ptq)")
    e.add_argument("--weight-mode", default=None, choices=WEIGHT_MODES,
                   help="per-channel weight grid (default: the convention's)")
    e.add_argument("--first-last-bits", type=_opt_bits, default=8,
                   help="bits of the first and last layer ('none' quantizes them like the rest)")
    e.add_argument("--calib-size", type=int, default=None,
                   help="calibration training images (default: 256 for rtn and rtn+bn, 1024 for the reconstructions)")
    e.add_argument("--iters", type=int, default=None,
                   help="reconstruction steps per block (default: 20000 on a GPU, 500 on a CPU)")
    e.add_argument("--recon-batch-size", type=int, default=32, help="images per reconstruction step")
    e.add_argument("--mixed", default=None, metavar="KIND=VALUE",
                   help="one mixed-precision budget (avg-bits=3, bytes=N or bops=N) instead of --bits, allocated as "
                        "dnq ptq --mixed allocates it")
    e.add_argument("--objective", default="predicted", help="the sensitivity the allocation minimises (one of "
                   "predicted, hawq, measured)")
    e.add_argument("--sensitivity", default=None, help="sensitivity file (default RUN/sensitivity.json)")
    e.add_argument("--abits", type=int, default=4, help="activation bits with --mixed")
    e.add_argument("--tie-shortcuts", action="store_true",
                   help="with --mixed, layers reading the same input get the same bits")
    e.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset ({MIN_OPSET}..{MAX_OPSET}): 4-bit weights are stored as INT4 from 21, 2-bit as "
                        "INT2 from 25, anything else in 8-bit integers")
    e.add_argument("--check", action="store_true",
                   help="run the export in onnxruntime on the test split and compare it with the fake-quantized "
                        "model (exit code 1 when the accuracy differs by more than 0.1 point or the argmax "
                        "agreement is below 99.5%%)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier dnq export at --out")
    e.add_argument("--device", default="auto", help="where the PTQ runs: auto (CUDA when present), cpu, cuda, cuda:N")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data", default=None, metavar="npz:PATH", help="the run's dataset at another place")
    e.add_argument("--data-root", default=None, help="folder of the torchvision datasets (default: the run's)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DNQ_DEBUG=1)")


def main(argv: list[str] | None = None) -> int:
    """The ``dnq`` command line; returns the exit code. Every error a user can cause is one line
    on stderr and exit code 2 (:func:`dnq_landscape_common.cli.guarded`); ``--debug`` or ``DNQ_DEBUG=1``
    shows the traceback."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    return guarded(f"dnq {args.command}", lambda: _run(args), args.debug or debug_requested(argv))


def _run(args) -> int:
    if args.command == "train":
        opts = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "overwrite", "quiet", "debug")}
        train(TrainConfig(**opts), resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    elif args.command == "ptq":
        report = run_ptq(args.run, args.bits, args.ranges, args.weight_mode, args.first_last_bits, args.calib_size,
                         args.fold_bn, args.device, args.seed, args.data_root, args.quiet,
                         bn_reestimate=args.bn_reestimate, methods=args.methods, iters=args.iters,
                         recon_batch_size=args.recon_batch_size, mixed=args.mixed, objectives=args.objective,
                         sensitivity=args.sensitivity, abits=args.abits, tie_shared_inputs=args.tie_shortcuts,
                         data=args.data, convention=args.convention, lr_rule=args.lr_rule)
        if report["fp"]["val_acc"] is not None:
            print(f"validation accuracy ({report['data']['val_size']} images):")
            print(format_table(report, "val_acc"))
            print(f"test accuracy ({report['data']['test_size']} images):")
        print(format_table(report))
        conv = report["settings"]["convention"]
        print(f"quantization convention: {conv['convention']} ({conv['source']})")
        print(f"wrote {args.run}/ptq.json")
    elif args.command == "export":
        return _export(args)
    return 0


def _export(args) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("command", "run", "out", "debug", "tie_shortcuts")}
    try:
        side = export_run(args.run, args.out, tie_shared_inputs=args.tie_shortcuts, **opts)
    except CheckFailed as e:
        print(f"dnq export: check failed: {e}", file=sys.stderr)
        side, code = json.loads(sidecar_path(Path(args.out).expanduser()).read_text()), 1
    else:
        code = 0
    print(format_export(side, args.out))
    return code


def entry() -> None:
    """Console-script entry point."""
    code = main()
    exit_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
