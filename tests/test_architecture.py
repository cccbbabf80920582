"""The one-way house, held at run time as well as by ``lint-imports`` (``make lint``).

- the import-linter contracts in ``pyproject.toml`` are kept (they run here too, so that a plain
  ``pytest`` catches a broken layer), and the instruments' contract lists every module of
  ``landscape`` that is not the meeting layer (a new module must be classified);
- importing ``dnq`` (trainer, PTQ, CLI) loads nothing of ``landscape``, and importing the
  instruments and figures loads neither ``dnq`` nor the study (checked in a fresh interpreter);
- ``dnq ptq --mixed`` gets a missing sensitivity entry from the provider ``landscape`` registers,
  and without one refuses with the command that makes it.
"""

from __future__ import annotations

import json
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import landscape

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = {c["id"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
             ["contracts"]}
# the meeting layer: the only modules of landscape that may import dnq
MEETING = ("landscape.cli", "landscape.study", "landscape.sensitivity_run", "landscape.report",
           "landscape.report_mixed", "landscape.report_sampling")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.replace("'", '"'))


def test_every_landscape_module_is_an_instrument_or_in_the_meeting_layer():
    instruments = set(CONTRACTS["instruments-know-no-dnq"]["source_modules"])
    top = {f"landscape.{m.name}" for m in pkgutil.iter_modules(landscape.__path__)}
    assert {"landscape.hessian", "landscape.study", "landscape.records"} <= top  # the walk sees the package
    unclassified = {m for m in top if m not in instruments and not m.startswith(MEETING)}
    assert not unclassified, f"add {sorted(unclassified)} to the instruments' contract in pyproject.toml, or to MEETING"
    assert not instruments & {m for m in top if m.startswith(MEETING)}
    assert set(CONTRACTS["instruments-know-no-dnq"]["forbidden_modules"]) >= {"dnq", *MEETING}


def test_the_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is in the dev extra: pip install -e '.[dev]'"
    out = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout[-3000:]
    assert out.stdout.count(" KEPT") == len(CONTRACTS) == 5


def test_dnq_loads_nothing_of_landscape():
    mods = _loaded_after("import dnq.train, dnq.ptq, dnq.cli, dnq.recon, dnq.mixed, dnq.sensitivity_file")
    assert "dnq.ptq" in mods and "dnq_landscape_common.precision" in mods
    assert not [m for m in mods if m == "landscape" or m.startswith("landscape.")]


def test_the_instruments_and_figures_load_neither_dnq_nor_the_study():
    mods = _loaded_after("import landscape, landscape.plot, landscape.plot_static, landscape.records")
    assert "landscape.hessian" in mods and "landscape.plot" in mods
    assert not [m for m in mods if m == "dnq" or m.startswith(("dnq.", *MEETING))]


def test_the_leaf_layer_loads_neither_package():
    mods = _loaded_after("import dnq_landscape_common.io, dnq_landscape_common.cli, dnq_landscape_common.device, "
                         "dnq_landscape_common.distributed, dnq_landscape_common.precision, "
                         "dnq_landscape_common.stats, dnq_landscape_common.html, dnq_landscape_common.tensors")
    assert "dnq_landscape_common.cli" in mods
    assert not [m for m in mods if m.split(".")[0] in ("dnq", "landscape")]


def test_non_finite_errors_share_one_base_and_print_as_one_line():
    from dnq.errors import NonFiniteLossError, ReconstructionError
    from dnq_landscape_common.cli import one_line
    from dnq_landscape_common.errors import NonFiniteError
    from landscape.errors import NonFiniteMeasurementError

    errors = [NonFiniteLossError("loss is NaN at step 3"), ReconstructionError("block 2: loss is Inf"),
              NonFiniteMeasurementError("hessian_trace", "loss", 0)]
    for e in errors:
        assert isinstance(e, NonFiniteError)
        assert "--debug" not in one_line(e)  # a known failure, not a bug: no traceback hint
    assert isinstance(errors[0], RuntimeError) and isinstance(errors[1], RuntimeError)  # as before
    assert one_line(RuntimeError("CUDA error")).endswith("(--debug shows the traceback)")


def test_one_device_parser_for_every_entry_point(monkeypatch):
    from dnq.errors import ConfigError
    from dnq.train import TrainConfig, validate
    from dnq_landscape_common.device import DeviceError, parse_device
    from landscape.study import Study, StudyConfig, StudyError, load_config

    for bad, expected in (("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device 'cuda:x'")):
        with pytest.raises(DeviceError, match=expected):
            parse_device(bad)
        with pytest.raises(ConfigError, match=expected):
            validate(TrainConfig(device=bad))
        with pytest.raises(StudyError, match=expected):
            Study(load_config("digits"), "unused", device=bad)
    assert isinstance(load_config("digits"), StudyConfig)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match="under torchrun"):
        parse_device("cuda:1")
    monkeypatch.delenv("WORLD_SIZE")
    assert parse_device("cpu").type == "cpu"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from dnq.train import TrainConfig, train

    out = tmp_path_factory.mktemp("arch") / "run"
    train(TrainConfig(data="digits", model="cnn-digits", epochs=1, out=str(out), device="cpu"), quiet=True)
    return out


def test_dnq_ptq_mixed_asks_the_registered_provider_or_names_the_command(digits_run, monkeypatch):
    import dnq.ptq
    from dnq.errors import SensitivityFileError
    from dnq.sensitivity_file import sensitivity_provider
    from landscape.sensitivity_run import run_sensitivity

    assert sensitivity_provider() is run_sensitivity  # the entry point of pyproject.toml
    monkeypatch.setattr(dnq.ptq, "sensitivity_provider", lambda: None)  # dnq installed without landscape
    with pytest.raises(SensitivityFileError, match=rf"landscape sensitivity {digits_run} --range minmax"):
        dnq.ptq.run_ptq(digits_run, mixed="avg-bits=3", methods="rtn", ranges="minmax", write=False, quiet=True)
    assert not (digits_run / "sensitivity.json").exists()
    calls = []

    def provider(run_dir, **kw):
        calls.append(kw["range_method"])
        return run_sensitivity(run_dir, bits=(2, 4), samples=64, matvecs=2, **kw)

    monkeypatch.setattr(dnq.ptq, "sensitivity_provider", lambda: provider)
    report = dnq.ptq.run_ptq(digits_run, mixed="avg-bits=3", methods="rtn", ranges="minmax", write=False, quiet=True)
    assert calls == ["minmax"] and (digits_run / "sensitivity.json").is_file()
    mixed = [r for r in report["results"] if r["mixed"] is not None]
    assert mixed and all(r["mixed"]["avg_bits"] <= 3 for r in mixed)
