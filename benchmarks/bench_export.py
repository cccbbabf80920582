"""The ONNX round-trip table (issue 24): every PTQ setting exported, run in onnxruntime, compared.

For each trained run (digits, cifar10-subset), convention, bit setting and PTQ method, and for
one mixed-precision allocation per run: ``dnq export ... --check`` (:func:`dnq.export.export_run`)
into a scratch folder, and one row from its sidecar: our (fake-quantized) test accuracy,
onnxruntime's on the exported graph and under onnxruntime's defaults (which quantize the float
biases to int32), the argmax agreement of each, the largest logit difference, the file size
against the float model's and the stored 4-bit weights against float32. One JSON row per
result, written atomically after each, so that an interrupted run resumes.

Usage:

    python benchmarks/bench_export.py RUN [RUN ...] --out benchmarks/export_roundtrip.json
    python benchmarks/bench_export.py --table benchmarks/export_roundtrip.json

Example:
    >>> row = {"run": "digits", "opset": 21, "convention": "dnq", "bits": "W4A4", "method": "rtn", "acc_ours": 98.06,
    ...        "acc_onnx": 98.06, "agreement": 1.0, "max_abs_diff": 0.0, "acc_default": 98.06,
    ...        "agreement_default": 1.0, "onnx_kib": 11.7, "float_kib": 57.4, "ratio": 0.204, "w4_ratio": 0.125}
    >>> print(table([row]).splitlines()[2])
    | digits | 21 | dnq | W4A4 | rtn | 98.06 | 98.06 | 100.00 | 0 | 98.06 / 100.00 | 11.7 / 57.4 (0.204) | W4: 0.125 |
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dnq.export import export_run
from dnq.io import atomic_write_json

BITS = ("W8A8", "W4A4", "W2A4")
METHODS = ("rtn", "rtn+bn", "qdrop")
CONVENTIONS = ("dnq", "paper")


def _key(r: dict) -> tuple:
    return (r["run"], r["convention"], r["bits"], r["method"], r.get("opset", 21))


def _row(name: str, side: dict) -> dict:
    c = side["check"]
    e, d = c["exported"], c["onnxruntime_default"]
    w4 = side["size"]["weights_by_bits"].get("4")
    return {"run": name, "opset": side["opset"], "convention": side["ptq"]["convention"], "bits": side["ptq"]["bits"],
            "method": side["ptq"]["method"], "n": e["n"], "acc_ours": e["acc_ours"], "acc_onnx": e["acc_onnx"],
            "agreement": e["agreement"], "max_abs_diff": e["max_abs_diff"], "logit_scale": e["logit_scale"],
            "acc_default": d.get("acc_onnx"), "agreement_default": d.get("agreement"),
            "default_error": d.get("error"), "passed": c["passed"],
            "onnx_kib": side["size"]["onnx_bytes"] / 1024, "float_kib": side["size"]["float_onnx_bytes"] / 1024,
            "ratio": side["size"]["ratio"], "w4_ratio": None if w4 is None else w4["ratio_to_float32"],
            "weight_ratios": {b: e["ratio_to_float32"] for b, e in side["size"]["weights_by_bits"].items()},
            "layers": {w["layer"]: w["bits"] for w in side["layers"]}, "time_s": side["time_s"],
            "onnxruntime": e["onnxruntime"]}


def run(runs: list[str], out: Path, bits: list[str], methods: list[str], conventions: list[str], iters: int,
        mixed: str | None, device: str, opset: int = 21) -> list[dict]:
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {_key(r) for r in rows}

    def save():
        atomic_write_json(out, {"command": " ".join(sys.argv), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "iters": iters, "rows": rows})

    jobs = [(rd, conv, b, m) for rd in runs for conv in conventions for b in bits for m in methods]
    jobs += [(rd, "dnq", mixed, "rtn") for rd in runs] if mixed else []
    with tempfile.TemporaryDirectory() as tmp:
        for rd, conv, b, m in jobs:
            name = Path(rd).name
            is_mixed = b == mixed
            label = f"avg-bits={mixed.split('=')[1]}:predicted" if is_mixed else b
            if (name, conv, label, m, opset) in done:
                continue
            t0 = time.perf_counter()
            side = export_run(rd, Path(tmp) / "m.onnx", bits=None if is_mixed else b, mixed=mixed if is_mixed else None,
                              method=m, convention=conv, iters=iters, check=True, overwrite=True, quiet=True,
                              device=device, opset=opset)
            row = _row(name, side)
            rows.append(row)
            save()
            print(f"{name} {conv} {row['bits']} {m}: ours {row['acc_ours']:.2f} onnx {row['acc_onnx']:.2f} "
                  f"agree {row['agreement']:.4f} default {row['acc_default']} / {row['agreement_default']} "
                  f"size {row['ratio']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of BENCHMARKS.md."""
    lines = ["| run | opset | convention | bits | method | acc ours | acc onnxruntime | agreement % | max abs diff | "
             "onnxruntime defaults: acc / agreement % | KiB: export / float (ratio) | sub-8-bit weights / float32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dflt = ("cannot load" if r.get("default_error") else
                f"{r['acc_default']:.2f} / {100 * r['agreement_default']:.2f}")
        ratios = r.get("weight_ratios") or ({"4": r["w4_ratio"]} if r.get("w4_ratio") else {})
        low = [b for b in ratios if int(b) < 8]
        w4 = "-" if not low else ", ".join(f"W{b}: {ratios[b]:.4g}" for b in sorted(low, key=int))
        lines.append(f"| {r['run']} | {r.get('opset', 21)} | {r['convention']} | {r['bits']} | {r['method']} | "
                     f"{r['acc_ours']:.2f} | {r['acc_onnx']:.2f} | {100 * r['agreement']:.2f} | "
                     f"{r['max_abs_diff']:.2g} | {dflt} | "
                     f"{r['onnx_kib']:.1f} / {r['float_kib']:.1f} ({r['ratio']:.3f}) | {w4} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="trained run folders (dnq train)")
    p.add_argument("--out", default="benchmarks/export_roundtrip.json")
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--conventions", default=",".join(CONVENTIONS))
    p.add_argument("--iters", type=int, default=500, help="reconstruction steps per block (qdrop)")
    p.add_argument("--mixed", default="avg-bits=3", help="one mixed allocation per run (dnq convention, rtn); "
                   "'none' for none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset of the exports (25: 2-bit weights as INT2)")
    p.add_argument("--table", default=None, help="print the table of a results file and exit")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())["rows"]))
        return
    run(a.runs, Path(a.out), a.bits.split(","), a.methods.split(","), a.conventions.split(","), a.iters,
        None if a.mixed == "none" else a.mixed, a.device, a.opset)


if __name__ == "__main__":
    main()
