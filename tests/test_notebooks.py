"""The three notebooks run top to bottom (small settings: LANDSCAPE_NB_FAST=1)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_instruments.ipynb", "03_sharpness_vs_ptq.ipynb"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def _execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _check_outputs(nb, stem: str) -> None:
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    # every figure is stored as the interactive plotly figure and as a PNG (GitHub and nbconvert show the PNG)
    figs = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figs) >= {"01_quickstart": 0, "02_instruments": 6, "03_sharpness_vs_ptq": 2}[stem]
    assert all("image/png" in o["data"] for o in figs)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "TqdmWarning" not in stderr and "IProgress not found" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_NB_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LANDSCAPE_STUDY", raising=False)
    nb = _execute(path, tmp_path)
    _check_outputs(nb, path.stem)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "OMP_NUM_THREADS" in first.source  # the thread count respects the environment
    assert os.environ.get("LANDSCAPE_NB_FAST") == "1"


def test_the_study_notebook_never_writes_into_the_users_study(tmp_path, monkeypatch):
    """Pointed at a user's study (LANDSCAPE_STUDY), notebook 03 reads it and writes its report elsewhere."""
    from landscape.study import Study, load_config

    study = tmp_path / "users-study"
    over = {"runs": [{"method": "sgd"}, {"method": "sam", "sam_rho": [0.1, 0.3]}], "seeds": [0],
            "train": {"epochs": 1}, "bits": ["W4A4"], "mixed": None,
            "instruments": {"hessian_samples": 64, "trace_matvecs": 6, "eig_k": 1, "density_runs": 1,
                            "density_steps": 4, "block_matvecs": 2, "noise_matvecs": 2, "surface_steps": 3,
                            "slice_steps": 3}}
    Study(load_config("digits", **over), study, device="cpu", progress=False).run()
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in study.rglob("*")}
    monkeypatch.setenv("LANDSCAPE_NB_FAST", "1")
    monkeypatch.setenv("LANDSCAPE_STUDY", str(study))
    nb = _execute(NOTEBOOKS[2], tmp_path)
    _check_outputs(nb, "03_sharpness_vs_ptq")
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in study.rglob("*")} == before
