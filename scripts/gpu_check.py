"""Every GPU check in one run, robust to failures: each stage runs even if an earlier one failed
or timed out, and each stage's result (pass/fail, seconds, and its figures: epoch times, images/s,
step-time ratios, instrument timings, Taylor-mode memory) goes to ``OUT/gpu_check.json`` (rewritten
after every stage) and its output to ``OUT/gpu_check.log``. Under ten minutes on one GPU: a global
budget (``--budget``, default 540 s) caps every stage's timeout, and stages past it are recorded
as skipped.

    python scripts/gpu_check.py [OUT_DIR] [--budget SECONDS] [--only STAGE,...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DATA = "synthetic:10:50000"  # CIFAR-10 shaped: 50,000 3x32x32 images, 10 classes (10,000 test)
# the pytest stage's environment on top of the others': a CUDA test runs under
# torch.use_deterministic_algorithms(True), which needs cuBLAS's deterministic workspace from the start
PYTEST_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _epochs(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return [{k: json.loads(ln)[k] for k in ("epoch", "time_s", "images_per_s", "train_loss")} for ln in lines]


def stages(out: Path, runs: Path) -> list[tuple[str, int, list[str], object]]:
    """(name, timeout in seconds, command, reader of its figures) in the order they run."""
    def train(name, timeout, method, epochs, *extra):
        run = runs / name
        cmd = [PY, "-m", "dnq", "train", "--data", DATA, "--model", "resnet20", "--method", method, "--epochs",
               str(epochs), "--batch-size", "512", "--lr", "0.2", "--out", str(run), "--overwrite", "--quiet", *extra]
        return name, timeout, cmd, lambda: {"epochs": _epochs(run)}

    def bench(name, timeout, script, *args):
        path = out / f"{name}.json"
        return name, timeout, [PY, str(ROOT / "benchmarks" / script), *args, "--json", str(path)], \
            lambda: json.loads(path.read_text())

    env = [PY, "-c", "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
           "'device': torch.cuda.get_device_name(), 'capability': torch.cuda.get_device_capability(), "
           "'cudnn_tf32_default': torch.backends.cudnn.allow_tf32, 'matmul_tf32_default': "
           "torch.backends.cuda.matmul.allow_tf32}))"]
    junit = out / "pytest_cuda.xml"
    subset = _cifar10_subset()
    study = runs / "study_cifar10_subset"
    missing = [PY, "-c", "import sys; sys.exit('cifar10-subset.npz not found: set CIFAR10_SUBSET=PATH')"]
    study_cmd = [PY, "-m", "landscape", "study", "--preset", "cifar10-subset", "--device", "cuda", "--out", str(study),
                 "--no-report", "--quiet", "--set", f"data=npz:{subset}"] if subset else missing
    return [
        # issue 22 first (a lease is 15 minutes): the captured steps against the eager ones, the instruments
        # against the peers, the CUDA tests, the study end to end; then the older stages
        ("environment", 60, env, None),
        # the training step (dnq.step_graph): sgd / dnq / sam on resnet20 and resnet18, CIFAR-100-shaped batches
        # of 128, bf16 + channels_last, eager and captured in the same run
        bench("train_graph", 240, "bench_train.py", "--suite", "graph", "--models", "resnet20,resnet18",
              "--batch-size", "128", "--rounds", "5", "--steps", "20"),
        # the reconstruction step (dnq.recon_step): eager and captured, ms per step, resnet20 and resnet18 blocks
        bench("recon_step", 300, "bench_recon.py", "--step", "--device", "cuda", "--steps", "200"),
        # ours against PyHessian (and curvlinops, loss-landscapes where installed) on resnet20, same run
        bench("instruments_peers", 240, "bench_instruments.py", "--device", "cuda", "--skip-digits"),
        # the CUDA variants of the tests taking the device fixture and the CUDA-only ones (graph replay equals
        # eager), with deterministic cuBLAS (PYTEST_ENV)
        ("pytest_cuda", 300, [PY, "-m", "pytest", "-m", "cuda", "tests", "--continue-on-collection-errors", "-q",
                              "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}"], lambda: _junit(junit)),
        # issue 23: the reconstruction budget table on real data (an SGD resnet20 on cifar10-subset, then QDrop
        # under the paper convention at 5,000 and 20,000 steps per block, paper learning rates, W4A4 and W2A4)
        ("budget_train", 150, [PY, "-m", "dnq", "train", "--data", f"npz:{subset}", "--model", "resnet20",
                               "--epochs", "12", "--val-size", "1000", "--out", str(runs / "budget_sgd"), "--overwrite",
                               "--quiet"] if subset else missing, None),
        ("budget_table", 600, [PY, str(ROOT / "benchmarks" / "bench_budget.py"), str(runs / "budget_sgd"),
                               "--steps", "5000,20000", "--methods", "qdrop", "--rules", "paper", "--device", "cuda",
                               "--out", str(out / "budget_table.json")],
         lambda: json.loads((out / "budget_table.json").read_text())),
        # the cifar10-subset study end to end on CUDA (8 models), its wall time in "seconds" (target <= 240)
        ("study_cifar10_subset", 600, study_cmd, lambda: {"models": len(list((study / "models").glob("*.json")))}),
        train("train_sgd", 150, "sgd", 3),
        train("train_dnq", 150, "dnq", 3),
        train("train_dnq_eager", 150, "dnq", 3, "--no-cuda-graph"),
        bench("bench_train", 240, "bench_train.py", "--suite", "issue8", "--models", "resnet20", "--batch-size", "512",
              "--rounds", "5"),
        bench("instruments", 150, "bench_instruments_cuda.py"),
        bench("taylor_memory", 120, "bench_taylor_memory.py"),
        # reconstruction PTQ on the GPU: 1,000 steps per block (x20 for the papers' 20,000)
        bench("recon", 240, "bench_recon.py", "--models", "resnet20", "--iters", "1000", "--device", "cuda"),
        train("train_dnq_compiled", 240, "dnq", 2, "--compile"),
    ]


def _cifar10_subset() -> str | None:
    """The cifar10-subset file: $CIFAR10_SUBSET, or shared/data/cifar10-subset.npz beside or above the repository."""
    for path in (os.environ.get("CIFAR10_SUBSET"), ROOT / "shared" / "data" / "cifar10-subset.npz",
                 ROOT.parent / "shared" / "data" / "cifar10-subset.npz"):
        if path and Path(path).is_file():
            return str(Path(path).resolve())
    return None


def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    cases = {}
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname')}::{tc.get('name')}"
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                status = tag if tag != "skipped" else "skipped"
                cases[name] = {"status": status, "time_s": float(tc.get("time", 0)),
                               "message": (el.get("message") or "")[:500]}
                break
        else:
            cases[name] = {"status": status, "time_s": float(tc.get("time", 0))}
    counts = {s: sum(c["status"] == s for c in cases.values()) for s in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all stages together")
    p.add_argument("--only", default="", help="comma-separated stage names (default: all)")
    p.add_argument("--runs", default=None, help="folder of the training runs (default: OUT_DIR/runs)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_check.log", "a", buffering=1)
    t_start = time.monotonic()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": a.budget, "stages": {}}
    only = {s for s in a.only.split(",") if s}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    for name, timeout, cmd, reader in stages(out, Path(a.runs) if a.runs else out / "runs"):
        if only and name not in only:
            continue
        left = a.budget - (time.monotonic() - t_start)
        rec: dict = {"command": " ".join(cmd)}
        if left < 20:
            rec.update(status="skipped", reason=f"budget spent ({a.budget:.0f} s)")
        else:
            limit = min(timeout, left)
            print(f"== {name} (timeout {limit:.0f} s)", flush=True)
            log.write(f"\n== {name}: {rec['command']}\n")
            t0 = time.monotonic()
            # a session of its own, so a timeout ends the stage's children too (compile workers)
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **PYTEST_ENV} if name == "pytest_cuda" else env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                text, _ = proc.communicate(timeout=limit)
                rec.update(status="passed" if proc.returncode == 0 else "failed", returncode=proc.returncode)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                text, _ = proc.communicate()
                rec.update(status="timeout", returncode=None)
            rec["seconds"] = round(time.monotonic() - t0, 1)
            log.write(text)
            rec["output_tail"] = text[-1500:]
            if name == "environment" and rec["status"] == "passed":
                rec["figures"] = json.loads(text.strip().splitlines()[-1])
            elif reader is not None:
                try:
                    rec["figures"] = reader()
                except Exception as e:  # noqa: BLE001 - a missing or partial result is reported, not fatal
                    rec["figures_error"] = f"{type(e).__name__}: {e}"
            print(f"   {rec['status']} in {rec['seconds']} s", flush=True)
        report["stages"][name] = rec
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out / "gpu_check.json")
    failed = [n for n, r in report["stages"].items() if r["status"] != "passed"]
    print(f"gpu_check: {len(report['stages']) - len(failed)} stages passed, {len(failed)} not: {failed}; "
          f"{out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
