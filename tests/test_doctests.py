"""The doctests of every module of ``dnq``, ``landscape`` and ``dnq_landscape_common`` run here, one case per module.

Each module must pass its doctests and show at least one example that actually runs and checks an output (an
example whose every line is ``+SKIP``, or which prints nothing, does not count), except the few modules in
:data:`EXEMPT`. The examples run in a fresh temporary working directory, and the global state they could leak
(torch's flags, default dtype and threads, the working directory, ``sys.stdout``/``sys.stderr``, environment
variables) must come back unchanged; the random number generators are restored after each module.
"""

from __future__ import annotations

import doctest
import importlib
import io
import os
import pkgutil
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dnq", "landscape", "dnq_landscape_common")
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: environment variables a library sets when it is first imported (``import sklearn``), not an example's doing
IMPORT_ENV = {"KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK"}

#: modules without a runnable example, and why (keep this short: a re-export shim is not exempt, its example can
#: show that the old import path gives the same object)
EXEMPT = {
    "dnq.__main__": "importing it runs the command line on sys.argv (`python -m dnq`); dnq.cli holds the examples",
}


def _walk() -> tuple[list[str], list[str]]:
    """The names of the packages' modules (subpackages included), and the errors met on the way."""
    names, errors = [], []
    for pkg_name in PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except Exception as e:  # reported by test_walk, not swallowed
            errors.append(f"{pkg_name}: {type(e).__name__}: {e}")
            continue
        names.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}.",
                                          onerror=lambda name: errors.append(f"{name}: {sys.exc_info()[1]!r}")):
            names.append(info.name)
    return sorted(set(names)), errors


MODULES, WALK_ERRORS = _walk()


def _files_on_disk() -> set[str]:
    """The module names the packages' ``.py`` files stand for, found without importing anything."""
    out = set()
    for pkg_name in PACKAGES:
        for path in (ROOT / pkg_name).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if any(p.startswith(".") or p == "__pycache__" for p in parts):
                continue
            out.add(".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts))
    return out


def test_walk_finds_every_module():
    assert not WALK_ERRORS, WALK_ERRORS
    assert len(MODULES) > 40
    for name in ("dnq", "dnq.quant", "dnq.models", "dnq.models.cnn", "landscape", "landscape.hessian",
                 "landscape.study", "dnq_landscape_common"):
        assert name in MODULES, name
    # every .py file is walked (a package whose __init__ fails, or a folder without one, would hide its modules)
    assert _files_on_disk() <= set(MODULES), sorted(_files_on_disk() - set(MODULES))


def test_exempt_modules_exist():
    for name, reason in EXEMPT.items():
        assert name in MODULES, f"stale EXEMPT entry {name}"
        assert len(reason) > 20, name


class _Snapshot:
    """The global state a doctest could change and must give back (the RNGs are restored, not checked)."""

    def __init__(self):
        self.state = self._state()
        self.rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        self.warnings = warnings.filters[:]

    @staticmethod
    def _state() -> dict:
        b = torch.backends
        return {
            "cwd": os.getcwd(), "stdout": sys.stdout, "stderr": sys.stderr,
            "environ": {k: v for k, v in os.environ.items() if k not in IMPORT_ENV},
            "default_dtype": torch.get_default_dtype(), "num_threads": torch.get_num_threads(),
            "grad_enabled": torch.is_grad_enabled(), "inference_mode": torch.is_inference_mode_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn.benchmark": b.cudnn.benchmark, "cudnn.deterministic": b.cudnn.deterministic,
            "cudnn.allow_tf32": b.cudnn.allow_tf32, "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32,
            "anomaly": torch.is_anomaly_enabled(),
        }

    def changes(self) -> dict:
        now = self._state()
        out = {k: (v, now[k]) for k, v in self.state.items() if now[k] != v and k != "environ"}
        env, env_now = self.state["environ"], now["environ"]
        out.update({f"environ[{k}]": (env.get(k), env_now.get(k)) for k in env.keys() | env_now.keys()
                    if env.get(k) != env_now.get(k)})
        return out

    def restore(self):
        s = self.state
        os.chdir(s["cwd"])
        sys.stdout, sys.stderr = s["stdout"], s["stderr"]
        for k in os.environ.keys() - s["environ"].keys() - IMPORT_ENV:
            del os.environ[k]
        os.environ.update(s["environ"])
        torch.set_default_dtype(s["default_dtype"])
        torch.set_num_threads(s["num_threads"])
        torch.set_grad_enabled(s["grad_enabled"])
        torch.use_deterministic_algorithms(s["deterministic"])
        torch.set_float32_matmul_precision(s["matmul_precision"])
        torch.backends.cudnn.benchmark = s["cudnn.benchmark"]
        torch.backends.cudnn.deterministic = s["cudnn.deterministic"]
        torch.backends.cudnn.allow_tf32 = s["cudnn.allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = s["cuda.matmul.allow_tf32"]
        torch.set_anomaly_enabled(s["anomaly"])
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.random.set_rng_state(self.rng[2])
        warnings.filters[:] = self.warnings


def _skipped(example: doctest.Example) -> bool:
    flags = OPTIONFLAGS
    for flag, on in example.options.items():
        flags = flags | flag if on else flags & ~flag
    return bool(flags & doctest.SKIP)


def _checked(tests: list[doctest.DocTest]) -> int:
    """How many examples run and compare an output."""
    return sum(1 for t in tests for ex in t.examples if not _skipped(ex) and ex.want.strip())


def test_checked_examples_are_counted():
    parse = doctest.DocTestParser().get_doctest
    assert _checked([parse(">>> 1 + 1  # doctest: +SKIP\n2\n>>> x = 1\n", {}, "t", None, 0)]) == 0
    assert _checked([parse(">>> 1 + 1  # doctest: +SKIP\n2\n>>> 1 + 1\n2\n", {}, "t", None, 0)]) == 1


@pytest.mark.parametrize("name", [m for m in MODULES if m not in EXEMPT])
def test_doctests(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    checked = _checked(tests)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = io.StringIO()
    cwd, tmp = os.getcwd(), tempfile.mkdtemp(prefix="dnq-doctest-")
    os.chdir(tmp)  # files an example writes by a relative path land in the temporary folder
    snap = _Snapshot()
    try:
        for t in sorted(tests, key=lambda t: t.name):
            runner.run(t, out=report.write)
        changed = snap.changes()
    finally:
        snap.restore()
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples of {name} failed:\n" \
                                 f"{report.getvalue()}"
    assert checked > 0, f"{name} has no runnable example that checks an output (every one is +SKIP, or none exists)"
    assert not changed, f"the examples of {name} changed the global state (before, after): {changed}"
