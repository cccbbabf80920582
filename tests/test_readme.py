"""Every code block of the README runs as written, top to bottom, in an empty folder.

The blocks are taken from README.md in order. ``bash`` blocks run with ``bash -e`` (the project's
``dnq`` and ``landscape`` commands on the PATH), ``python`` blocks in a fresh interpreter, each in
the same scratch folder, so that a block may use what an earlier one made (the quick start's run
folders), as a reader following the README would. A ``make TARGET`` line runs the recipe the
Makefile gives that target (with this environment's Python), in the scratch folder rather than
the checkout. A ``toml`` block is written to the file its first comment names and read with
:func:`landscape.study.load_config`.

A block the test cannot run says so just above it in the README, with its reason:
``<!-- readme-test: skip (REASON) -->``, or ``<!-- readme-test: parse (REASON) -->`` for a config
file that is read and validated but not run. Blocks without a language are synopses or program
output, not code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*(?P<verb>skip|parse)\s*\((?P<why>[^)]+)\)\s*-->\s*\n)?"
                   r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.S | re.M)
CODE = ("bash", "python", "toml")

pytestmark = pytest.mark.slow


def blocks() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("lang")) + 1
        out.append({"lang": m["lang"], "body": m["body"], "verb": m["verb"], "why": m["why"], "line": line})
    return out


def make_recipe(target: str) -> list[str]:
    """The commands of a Makefile target, ``$(PY)`` and ``$(VENV)/bin/python`` being this Python."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", ln))
    recipe = []
    for ln in lines[start + 1:]:
        if not ln.startswith("\t"):
            break
        cmd = ln[1:].lstrip("@").replace("$(PY)", sys.executable)
        recipe.append(cmd)
    if not recipe:
        raise AssertionError(f"the Makefile's {target!r} target has no recipe")
    return recipe


def as_script(body: str) -> str:
    out = []
    for ln in body.splitlines():
        m = re.match(r"^make\s+([\w-]+)\s*(#.*)?$", ln.strip())
        out += make_recipe(m[1]) if m else [ln]
    return "\n".join(out) + "\n"


def test_the_readme_blocks_are_all_accounted_for():
    found = blocks()
    code = [b for b in found if b["lang"] in CODE]
    assert len(code) >= 12, "the README's code blocks were not found"
    assert {b["lang"] for b in found} <= set(CODE) | {""}, {b["lang"] for b in found}
    for b in found:
        if b["verb"]:
            assert b["lang"] in CODE and len(b["why"].strip()) > 10, b
        if b["verb"] == "parse":
            assert b["lang"] == "toml", b
    skipped = [b for b in code if b["verb"] == "skip"]
    assert len(skipped) <= 4, [b["line"] for b in skipped]  # install, make test, and the two 8-GPU commands


def test_every_readme_block_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("DNQ_DEBUG", None)
    env.pop("LANDSCAPE_DEBUG", None)
    ran = []
    for b in blocks():
        if b["lang"] not in CODE or b["verb"] == "skip":
            continue
        where = f"README.md line {b['line']}"
        if b["lang"] == "toml":
            m = re.match(r"#\s*([\w.-]+\.toml)", b["body"])
            assert m, f"{where}: a toml block's first line names its file (# name.toml: ...)"
            path = tmp_path / m[1]
            path.write_text(b["body"])
            code = f"from landscape.study import load_config; c = load_config(config={str(path)!r}); print(c.name)"
            cmd = [sys.executable, "-c", code]
        elif b["lang"] == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", as_script(b["body"])]
        else:
            cmd = [sys.executable, "-c", b["body"]]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, f"{where} failed ({p.returncode}):\n{b['body']}\n--- stderr:\n{p.stderr[-4000:]}"
        ran.append((b["line"], b["lang"], p.stdout))
        print(f"README.md line {b['line']} ({b['lang']}): {time.perf_counter() - t0:.1f} s")
    # what the blocks promise exists
    assert (tmp_path / "runs" / "digits-dnq" / "ptq.json").is_file()
    assert (tmp_path / "runs" / "digits-sgd" / "sensitivity.json").is_file()
    assert (tmp_path / "reports" / "digits" / "report.html").is_file()
    assert (tmp_path / "surface.png").read_bytes()[:4] == b"\x89PNG"
    table = next(out for _, lang, out in ran if "setting" in out and "W2A4" in out)
    lines = table.splitlines()
    at = lines.index("test accuracy (360 images):")
    assert lines[at + 1].split() == ["setting", "minmax", "minmax+bn", "percentile", "percentile+bn", "mse", "mse+bn"]
    assert [ln.split()[0] for ln in lines[at + 2:at + 8]] == ["FP", "W8A8", "W6A6", "W4A4", "W3A3", "W2A4"]
    assert len(ran) >= 10
