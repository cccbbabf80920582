"""The ``landscape`` command: ``landscape study`` runs (or resumes) a study, ``landscape report``
writes its report, ``landscape sensitivity`` measures a run's per-layer quantization sensitivity.

    landscape study --preset digits --out reports/digits
    landscape study --config my_study.toml --out reports/mine --set train.epochs=2
    landscape study --preset paper --plan          # the stages and their estimated time; trains nothing
    landscape report reports/digits
    landscape sensitivity runs/digits-sgd --bits 2,3,4,8 --samples 512

Every error a user can cause (a bad flag or setting, a corrupt file, a folder in use, a device
that is not there, a model whose loss is not finite) is one line on stderr,
``landscape <command>: error: ...``, and exit code 2, with nothing written
(:func:`dnq_landscape_common.cli.guarded`); ``--debug`` (or the environment variable
``LANDSCAPE_DEBUG=1``) shows the traceback instead. An interrupted study (Ctrl-C)
exits with code 130 and resumes when the same command is run again.

Example:
    >>> import sys
    >>> from landscape.cli import main
    >>> saved, sys.stderr = sys.stderr, sys.stdout  # show stderr here
    >>> main(["study", "--preset", "digits", "--out", "unused", "--set", "train.epochs"])
    landscape study: error: --set expects KEY=VALUE (for example train.epochs=2), got 'train.epochs'
    2
    >>> main(["report", "no/such/study"])  # doctest: +ELLIPSIS
    landscape report: error: no/such/study is not a folder (it does not exist); give the folder of a study ...
    2
    >>> sys.stderr = saved
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dnq_landscape_common.cli import (
    OneLineParser,
    UsageError,
    debug_requested,
    guarded,
    one_line,
    one_line_warnings,
)
from dnq_landscape_common.distributed import exit_distributed

from . import __version__
from .report import build
from .sensitivity_run import SENSITIVITY_FILE, format_sensitivity_table, run_sensitivity
from .study import PRESETS, Study, StudyError, load_config
from .study.plan import check_plan_json, format_plan, make_plan, write_plan_json

__all__ = ["DEBUG_ENV", "OneLineParser", "UsageError", "build_parser", "debug_requested", "entry", "guarded", "main",
           "one_line", "one_line_warnings"]  # the error helpers stay importable here, their old home

DEBUG_ENV = "LANDSCAPE_DEBUG"


def _parse_set(items: list[str]) -> dict:
    """``a.b=value`` pairs into a nested dict (values parsed as JSON when they parse).

    Raises:
        StudyError: an item without ``=``, an empty key or key part, or two items that give a key
            both a value and sub-keys.
    """
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise StudyError(f"--set expects KEY=VALUE (for example train.epochs=2), got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise StudyError(f"--set {item!r}: the key must be a name or a dotted path such as train.epochs")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise StudyError(f"--set {item!r}: {p} was given a value by another --set; give either {p}=VALUE "
                                 f"or {p}.KEY=VALUE")
        if isinstance(d.get(parts[-1]), dict) and not isinstance(value, dict):
            raise StudyError(f"--set {item!r}: {key} was given sub-keys by another --set; give either {key}=VALUE "
                             f"or {key}.KEY=VALUE")
        d[parts[-1]] = value
    return out


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="landscape", description="Loss-landscape instruments for PyTorch models: studies that "
                      "tie flatness to post-training-quantization accuracy, and their reports.")
    p.add_argument("--version", action="version", version=f"landscape {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also LANDSCAPE_DEBUG=1)")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("study", help="train, quantize and measure a set of models (resumable)")
    s.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="digits (default), cifar10-subset, cifar100 or paper")
    s.add_argument("--config", default=None, help="a JSON or TOML study file (its keys override the preset's)")
    s.add_argument("--out", default=None, help="the study directory (rerun the same command to resume); required "
                   "unless --plan")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. train.epochs=2 or instruments.surface_steps=7 (repeatable)")
    s.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the report when the study is done (default: yes)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--plan", action="store_true",
                   help="train nothing: time one unit of every stage on this device (synthetic data of the dataset's "
                        "shape) and print each stage's count and estimated time, and the total; with --out, the work "
                        "finished there is left out")
    s.add_argument("--plan-json", default=None, metavar="PATH", help="with --plan: also write the plan as JSON")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also LANDSCAPE_DEBUG=1)")
    r = sub.add_parser("report", help="write report.html, figures and summary.csv/json of a study")
    r.add_argument("path", help="the study directory")
    r.add_argument("--no-static", action="store_true", help="skip the PNG/PDF figures (faster)")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also LANDSCAPE_DEBUG=1)")
    e = sub.add_parser("sensitivity", help="per-layer quantization sensitivity of a dnq run (predicted, hawq, "
                       "measured) into RUN/sensitivity.json")
    e.add_argument("run", help="a run folder written by `dnq train` (with model.pt)")
    e.add_argument("--bits", default="2,3,4,8", help="candidate weight bit-widths")
    e.add_argument("--samples", type=int, default=512,
                   help="training images (validation excluded) for H and the losses")
    e.add_argument("--matvecs", type=int, default=64, help="Hutchinson probes shared by every layer and bit-width")
    e.add_argument("--range", default="minmax", help="weight/activation range method of the quantizer "
                   "(minmax, percentile, mse): the one the PTQ will use")
    e.add_argument("--seed", type=int, default=0, help="seed of the images and probes")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    e.add_argument("--out", default=None, help="the sensitivity file (default RUN/sensitivity.json)")
    e.add_argument("--recompute", action="store_true", help="measure again even if the file has these settings")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also LANDSCAPE_DEBUG=1)")
    p.commands = {"study": s, "report": r, "sensitivity": e}
    return p


def _run(a) -> int:
    if a.command == "sensitivity":
        entry = run_sensitivity(a.run, a.bits, a.samples, matvecs=a.matvecs, range_method=a.range, seed=a.seed,
                                device=a.device, out=a.out, quiet=a.quiet, recompute=a.recompute)
        for objective in ("predicted", "hawq", "measured", "measured_wa"):
            print(format_sensitivity_table(entry, objective) + "\n")
        c = entry["cost"]
        print(f"cost: {c['matvecs']} Hessian-vector products, {c['quadratic_forms']} quadratic forms, 1 gradient: "
              f"{c['curvature_gradient_equivalents']:.1f} gradient-equivalents ({c['curvature_s']:.1f} s); measured: "
              f"{c['forward_passes']} forward passes, {c['measured_gradient_equivalents']:.1f} gradient-equivalents "
              f"({c['measured_s']:.1f} s)")
        print(a.out or os.path.join(a.run, SENSITIVITY_FILE))
        return 0
    if a.command == "study":
        cfg = load_config(a.preset, a.config, **_parse_set(a.set))
        if a.plan_json is not None and not a.plan:
            raise StudyError("--plan-json writes a plan: give --plan with it")
        if a.plan:
            if a.plan_json is not None:
                check_plan_json(a.plan_json)  # before the minutes of timing
            plan = make_plan(cfg, a.out, device=a.device, progress=not a.quiet)
            print(format_plan(plan))
            if a.plan_json is not None:
                print(write_plan_json(plan, a.plan_json))
            return 0
        if a.out is None:
            raise StudyError("the study needs a folder: give --out FOLDER (or --plan to estimate its time)")
        Study(cfg, a.out, device=a.device, progress=not a.quiet).run()
        print(build(a.out, only_if_changed=True) if a.report else a.out)
    else:
        print(build(a.path, static=not a.no_static))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``landscape`` command line; returns the exit code (0, 2 for an error, 130 when
    interrupted)."""
    p = build_parser()
    try:
        a, extra = p.parse_known_args(argv)
        if extra:  # named by the command they were given to
            p.commands.get(a.command, p).error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    if a.command is None:
        p.print_help()
        return 0
    return guarded(f"landscape {a.command}", lambda: _run(a), a.debug or debug_requested(argv, DEBUG_ENV))


def entry() -> None:
    """Console-script entry point (ends torchrun workers without the exit-time abort that
    :func:`dnq_landscape_common.distributed.exit_distributed` documents)."""
    code = main()
    exit_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
