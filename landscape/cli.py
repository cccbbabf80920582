"""The ``landscape`` command: ``landscape study`` runs (or resumes) a study, ``landscape report``
writes its report.

    landscape study --preset digits --out reports/digits
    landscape study --config my_study.toml --out reports/mine --set train.epochs=2
    landscape report reports/digits
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _parse_set(items: list[str]) -> dict:
    """``a.b=value`` pairs into a nested dict (values parsed as JSON when they parse)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE (for example train.epochs=2), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="landscape", description="Loss-landscape instruments for PyTorch models: "
                                "studies that tie flatness to post-training-quantization accuracy, and their reports.")
    p.add_argument("--version", action="version", version=f"landscape {__version__}")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("study", help="train, quantize and measure a set of models (resumable)")
    s.add_argument("--preset", default=None, help="digits (default), cifar10-subset or cifar100")
    s.add_argument("--config", default=None, help="a JSON or TOML study file (its keys override the preset's)")
    s.add_argument("--out", required=True, help="the study directory (rerun the same command to resume)")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. train.epochs=2 or instruments.surface_steps=7 (repeatable)")
    s.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the report when the study is done (default: yes)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    r = sub.add_parser("report", help="write report.html, figures and summary.csv/json of a study")
    r.add_argument("path", help="the study directory")
    r.add_argument("--no-static", action="store_true", help="skip the PNG/PDF figures (faster)")
    a = p.parse_args(argv)
    if a.command is None:
        p.print_help()
        return 0
    from .study import StudyError

    try:
        if a.command == "study":
            from .study import Study, load_config

            cfg = load_config(a.preset, a.config, **_parse_set(a.set))
            Study(cfg, a.out, device=a.device, progress=not a.quiet).run()
            if a.report:
                from .report import build

                print(build(a.out))
            else:
                print(a.out)
        else:
            from .report import build

            print(build(a.path, static=not a.no_static))
    except StudyError as e:
        print(f"landscape {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """Console-script entry point (ends torchrun workers without the exit-time abort that
    ``dnq.cli`` documents)."""
    from dnq.cli import exit_distributed

    code = main()
    exit_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
