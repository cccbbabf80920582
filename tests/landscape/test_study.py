"""landscape.study end to end on a tiny config, resume (also after killing a real process), and
landscape.report built from it (sections, escaping, static figures, a real headless browser)."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from landscape.study import Study, StudyConfig, StudyError, load_config, load_records, summary_rows
from tests.conftest import TEST_THREADS

EVIL = "<script>alert(1)</script>"
TINY = {
    "name": "tiny", "data": "digits", "model": "cnn-digits",
    "runs": [{"method": "sgd", "name": EVIL}, {"method": "dnq", "lambda_max": [1.0]}, {"method": "sam", "sam_rho": 0.1},
             {"method": "dnq-w", "lambda_max": 2.0}],
    "seeds": [0], "bits": ["W4A4", "W3A3"], "train_bits": "W3A3",
    "train": {"epochs": 1, "batch_size": 128, "device": "cpu"},
    "instruments": {"hessian_samples": 128, "hessian_batch": 64, "trace_matvecs": 6, "eig_k": 2, "eig_tol": 1e-2,
                    "density_runs": 1, "density_steps": 6, "block_matvecs": 2, "noise_matvecs": 4,
                    "surface_steps": 3, "slice_steps": 5},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    torch.set_num_threads(TEST_THREADS)
    out = tmp_path_factory.mktemp("study") / "tiny"
    cfg = StudyConfig.from_dict(TINY)
    records = Study(cfg, out, device="cpu", progress=False).run()
    return cfg, out, records


def test_every_model_has_every_measurement_and_they_agree_with_each_other(study):
    cfg, out, records = study
    assert [r["id"] for r in records] == [e["id"] for e in cfg.expand()] and len(records) == 4
    for rec in records:
        m = rec["measurements"]
        expected = {"fp", "trace", "eigen", "density", "blocks", "surface"} | {
            f"{k}:{b}" for k in ("ptq", "ptq+bn", "noise", "slice") for b in cfg.bits}
        assert set(m) == expected
        # both PTQ variants on both splits; the model's validation split is the trainer's (20% of digits)
        for b in cfg.bits:
            assert m[f"ptq:{b}"]["value"]["variant"] == "rtn" and m[f"ptq+bn:{b}"]["value"]["variant"] == "rtn+bn"
            assert all(0 <= m[k]["value"][f"{s}_acc"] <= 1
                       for k in (f"ptq:{b}", f"ptq+bn:{b}") for s in ("val", "test"))
        assert (out / rec["run_dir"] / "model.pt").is_file()
        for b in cfg.bits:
            noise, sl = m[f"noise:{b}"]["value"], m[f"slice:{b}"]["value"]
            grid = [round(a, 9) for a in sl["alphas"]]
            # the slice at alpha = 0 is the FP loss, at alpha = 1 the weight-quantized loss (same images)
            assert sl["loss"][grid.index(0.0)] == pytest.approx(noise["loss_fp"], rel=1e-5)
            assert sl["loss"][grid.index(1.0)] == pytest.approx(noise["loss_weight_quantized"], rel=1e-5)
            assert noise["trace_h_sigma"] > 0 and noise["measured"] == pytest.approx(
                noise["loss_weight_quantized"] - noise["loss_fp"])
        assert m["surface"]["value"]["center_loss"] == pytest.approx(m["noise:W4A4"]["value"]["loss_fp"], rel=1e-5)
        assert 0 <= m["fp"]["value"]["test_acc"] <= 1 and 0 <= m["fp"]["value"]["val_acc"] <= 1
    splits = json.loads((out / "study.json").read_text())["splits"]
    assert splits == {"train": 1150, "val": 287, "test": 360, "calibration": 256, "hessian": 128}
    assert [r["config"] for r in records] == ["_script_alert_1___script_", "dnq-lam1", "sam-rho0.1", "dnq-w-lam2"]
    assert records[0]["name"] == EVIL and records[0]["id"] == "_script_alert_1___script_-s0"


def test_rerun_skips_finished_work_and_a_changed_budget_redoes_only_its_measurement(study):
    cfg, out, _ = study
    before = {r["id"]: r for r in load_records(out)}
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.pt")}
    Study(cfg, out, device="cpu", progress=False).run()
    after = {r["id"]: r for r in load_records(out)}
    assert after == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.pt")}
    d = cfg.to_dict()
    d["instruments"]["eig_k"] = 1
    Study(StudyConfig.from_dict(d), out, device="cpu", progress=False).run()
    changed = {r["id"]: r for r in load_records(out)}
    for rid, rec in changed.items():
        for name, m in rec["measurements"].items():
            old = before[rid]["measurements"][name]
            same = m["at"] == old["at"] and m["key"] == old["key"]
            assert same == (name != "eigen"), (rid, name)
        assert len(rec["measurements"]["eigen"]["value"]["eigenvalues"]) == 1


def test_a_killed_study_loses_nothing_it_had_finished(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["runs"] = cfg["runs"][:2]
    cfg["instruments"]["surface_steps"] = 9  # a slow tail after the trace, to be killed in
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "landscape.cli", "study", "--config", str(path), "--out", str(out), "--quiet",
           "--no-report", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            recs = list((out / "models").glob("*.json")) if (out / "models").is_dir() else []
            if recs:
                rec = json.loads(recs[0].read_text())
                if "trace" in rec.get("measurements", {}):
                    first = rec
                    break
            time.sleep(0.05)
        assert first is not None, ("the study never finished a trace: "
                                   f"{proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_then = {k: v["at"] for k, v in first["measurements"].items()}
    model_pt = out / first["run_dir"] / "model.pt"
    stamp = model_pt.stat().st_mtime_ns
    Study(load_config(config=path), out, device="cpu", progress=False).run()
    recs = {r["id"]: r for r in load_records(out)}
    assert len(recs) == 2
    again = recs[first["id"]]
    for k, at in done_then.items():
        assert again["measurements"][k]["at"] == at, k  # not recomputed
    assert model_pt.stat().st_mtime_ns == stamp  # not retrained
    assert all(len(r["measurements"]) == 14 for r in recs.values())  # 6 + 4 kinds x 2 bit-widths


def test_configs_are_validated_with_the_fix_named(tmp_path):
    with pytest.raises(StudyError, match="unknown study keys"):
        StudyConfig.from_dict({"nmae": "x"})
    with pytest.raises(StudyError, match="unknown instrument keys"):
        StudyConfig.from_dict({"instruments": {"trace_probes": 3}})
    with pytest.raises(StudyError, match="has no 'method'"):
        StudyConfig.from_dict({"runs": [{"lambda_max": 1.0}]})
    with pytest.raises(StudyError, match="bad bit-width"):
        StudyConfig.from_dict({"bits": ["W9A4"]})
    with pytest.raises(StudyError, match="several models"):
        load_config("cifar100")
    with pytest.raises(StudyError, match="unknown preset"):
        load_config("imagenet")
    toml = tmp_path / "s.toml"
    toml.write_text('name = "t"\nseeds = [0, 1]\n[train]\nepochs = 3\n'
                    '[[runs]]\nmethod = "sam"\nsam_rho = [0.05, 0.1]\n')
    cfg = load_config(config=toml)
    assert [e["id"] for e in cfg.expand()] == ["sam-rho0.05-s0", "sam-rho0.05-s1", "sam-rho0.1-s0", "sam-rho0.1-s1"]
    assert cfg.expand()[0]["settings"]["epochs"] == 3
    assert cfg.instruments.surface_steps == 11  # the digits preset's value under the file's keys
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    with pytest.raises(StudyError, match="not empty"):
        Study(StudyConfig.from_dict(TINY), full, device="cpu").prepare()
    assert (full / "mine.txt").read_text() == "keep me"


def test_the_digits_preset_sweeps_methods_and_strengths():
    cfg = load_config("digits")
    ids = [e["id"] for e in cfg.expand()]
    methods = {e["settings"]["method"] for e in cfg.expand()}
    assert methods == {"sgd", "dnq", "dnq-w", "dnq-a", "gaussian", "gaussian-iso", "sam"}
    assert len(ids) == len(set(ids)) >= 10
    # the seeds of one configuration share its cluster label, and only they do
    configs = {}
    for e in cfg.expand():
        configs.setdefault(e["config"], set()).add(e["settings"]["seed"])
    assert len(configs) == len(ids) // len(cfg.seeds) and all(v == set(cfg.seeds) for v in configs.values())


# -- the report -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(study):
    from landscape.report import build

    _, out, _ = study
    return build(out, n_boot=200)


def test_report_has_every_section_works_offline_and_escapes_user_strings(study, report):
    _, out, records = study
    text = report.read_text()
    for anchor in ("summary", "correlations", "scatter", "prediction", "models"):
        assert f"id='{anchor}'" in text
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=", text)  # nothing loaded from elsewhere
    assert len(text) > 3_000_000  # plotly.js itself is embedded
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    figures = re.search(r"<script type='application/json' id='figures-data'>(.*?)</script>", text, re.S).group(1)
    assert "<" not in figures
    figs = json.loads(figures)
    n_plots = len(re.findall(r"<div id='fig\d+' class='plot'>", text))
    # per model: density, surface (3-D and contour), slices; across models: a scatter per bit-width, the prediction
    assert n_plots == len(figs) == 4 * len(records) + 2 + 1
    assert any(t.get("type") == "surface" for f in figs.values() for t in f["data"])
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [r["name"] for r in records]
    summary = json.loads((out / "summary.json").read_text())
    assert {c["y"] for c in summary["correlations"]} >= {"acc_drop_W4A4", "acc_drop_W3A3"}
    for stem in ("sharpness_vs_ptq_W4A4", "sharpness_vs_ptq_W3A3", "measured_vs_predicted"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{stem}.{ext}").stat().st_size > 1000


def test_report_cli_and_module_entry_points(study, tmp_path):
    _, out, _ = study
    r = subprocess.run([sys.executable, "-m", "landscape.report", str(out), "--out", str(tmp_path / "a.html"),
                        "--no-static"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and Path(r.stdout.strip()) == tmp_path / "a.html"
    r = subprocess.run([sys.executable, "-m", "landscape.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "no study.json" in r.stderr


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_a_real_browser_without_javascript_errors(report, tmp_path):
    browser = _browser()
    if browser is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium on PATH, and REQUIRE_BROWSER=1 (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH (.ci/run installs it; set REQUIRE_BROWSER=1 to fail instead)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000"]
    url = report.resolve().as_uri()
    r = subprocess.run([browser, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                       capture_output=True, text=True, timeout=300)
    status = re.search(r"<p id=\"report-status\"([^>]*)>(.*?)</p>", r.stdout, re.S)
    assert status is not None, r.stderr[-3000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', status.group(1)))
    assert attrs.get("done") == "1", status.group(0)
    assert attrs["errors"] == "0", status.group(2)
    assert int(attrs["plots"]) > 0 and attrs["rendered"] == attrs["plots"], status.group(2)
    console_errors = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)]
    assert not console_errors, console_errors
    shot = Path(os.environ.get("REPORT_SCREENSHOT", tmp_path / "report.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, *flags, "--hide-scrollbars", "--window-size=1300,2400", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=300)
    assert shot.stat().st_size > 20_000


def test_summary_rows_tolerate_a_study_still_running(study):
    _, out, records = study
    partial = json.loads(json.dumps(records[:1]))
    del partial[0]["measurements"]["trace"]
    row = summary_rows(partial, ["W4A4"])[0]
    assert row["trace"] is None and row["acc_drop_W4A4"] is not None


@pytest.mark.slow
def test_a_study_under_torchrun_matches_one_process(tmp_path):
    """2 gloo ranks: data-parallel training (mlp-digits has no BatchNorm: exact parity) and sharded
    curvature products give the single-process study's numbers; rank 0 alone writes."""
    cfg = json.loads(json.dumps(TINY))
    cfg.update(model="mlp-digits", runs=[{"method": "dnq-w", "lambda_max": 1.0}], bits=["W4A4"])
    cfg["train"]["batch_size"] = 64
    cfg["instruments"].update(trace_method="hutchinson", trace_matvecs=8, eig_tol=1e-6)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "landscape.cli", "study", "--config", str(path), "--out", str(tmp_path / "ddp"),
                        "--quiet", "--no-report", "--device", "cpu"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    Study(load_config(config=path), tmp_path / "one", device="cpu", progress=False).run()
    (a,), (b,) = load_records(tmp_path / "ddp"), load_records(tmp_path / "one")
    ma, mb = a["measurements"], b["measurements"]
    assert set(ma) == set(mb)
    assert ma["trace"]["value"]["value"] == pytest.approx(mb["trace"]["value"]["value"], rel=1e-4)
    assert ma["eigen"]["value"]["eigenvalues"] == pytest.approx(mb["eigen"]["value"]["eigenvalues"], rel=1e-4)
    for k in ("loss_fp", "loss_weight_quantized", "trace_h_sigma"):
        assert ma["noise:W4A4"]["value"][k] == pytest.approx(mb["noise:W4A4"]["value"][k], rel=1e-4), k
    flat = [v for row in ma["surface"]["value"]["loss"] for v in row]
    assert flat == pytest.approx([v for row in mb["surface"]["value"]["loss"] for v in row], rel=1e-4)


def test_records_of_runs_no_longer_configured_are_kept_but_not_reported(study, tmp_path):
    _, out, records = study
    other = shutil.copytree(out, tmp_path / "copy")
    (other / "models" / "old-s0.json").write_text(json.dumps({"id": "old-s0", "settings": {"method": "sgd"},
                                                              "measurements": {}}))
    assert [r["id"] for r in load_records(other)] == [r["id"] for r in records]
    assert [r["id"] for r in load_records(other, include_other=True)][-1] == "old-s0"


# ---------------------------------------------------------------- reconstruction PTQ in a study
def test_ptq_methods_are_keyed_resumable_measurements(tmp_path, monkeypatch):
    import dnq.ptq

    cfg = StudyConfig.from_dict({**TINY, "name": "recon", "runs": [{"method": "sgd"}], "bits": ["W4A4", "W2A4"],
                                 "ptq": ["rtn", "qdrop", "adaround"],
                                 "instruments": {**TINY["instruments"], "surface_steps": 2, "slice_steps": 3}})
    assert cfg.ptq["variants"] == ["rtn", "qdrop", "adaround"] and cfg.ptq["recon_calib_size"] == 1024
    cfg = StudyConfig.from_dict({**cfg.to_dict(), "ptq": {**cfg.ptq, "recon_iters": 4, "recon_calib_size": 64}})
    calls = []
    original = dnq.ptq.reconstruct  # the study's PTQ is dnq.ptq.apply_ptq, which calls it
    monkeypatch.setattr(dnq.ptq, "reconstruct", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    out = tmp_path / "recon"
    rec, = Study(cfg, out, device="cpu", progress=False).run()
    m = rec["measurements"]
    assert sorted(calls) == sorted(["qdrop", "qdrop", "adaround", "adaround"])
    for b in cfg.bits:
        for meth in ("qdrop", "adaround"):
            v = m[f"ptq+{meth}:{b}"]["value"]
            assert v["variant"] == meth and v["calib_size"] == 64 and v["recon_iters"] == 4
            assert 0 <= v["test_acc"] <= 1 and v["val_acc"] is not None
        assert f"ptq+bn:{b}" not in m
    row, = summary_rows([rec], cfg.bits)
    assert row["ptq_acc_W2A4_qdrop"] == m["ptq+qdrop:W2A4"]["value"]["test_acc"]
    assert row["acc_drop_W4A4_adaround"] == pytest.approx(row["fp_acc"] - m["ptq+adaround:W4A4"]["value"]["test_acc"])
    # a rerun does not redo a finished reconstruction; a changed reconstruction budget redoes only those
    calls.clear()
    Study(cfg, out, device="cpu", progress=False).run()
    assert calls == [] and load_records(out)[0]["measurements"] == m
    more = StudyConfig.from_dict({**cfg.to_dict(), "ptq": {**cfg.ptq, "recon_iters": 5}})
    Study(more, out, device="cpu", progress=False).run()
    assert sorted(calls) == sorted(["qdrop", "qdrop", "adaround", "adaround"])
    after = load_records(out)[0]["measurements"]
    assert after["ptq:W4A4"] == m["ptq:W4A4"] and after["trace"] == m["trace"]
    assert after["ptq+qdrop:W4A4"]["value"]["recon_iters"] == 5


def test_bad_ptq_methods_are_refused_with_the_valid_ones():
    valid = "must be a non-empty list of PTQ methods \\(rtn, rtn\\+bn, adaround, brecq, qdrop\\)"
    with pytest.raises(StudyError, match=valid):
        StudyConfig.from_dict({**TINY, "ptq": ["rtn", "gptq"]})
    with pytest.raises(StudyError, match="lists a method twice"):
        StudyConfig.from_dict({**TINY, "ptq": ["rtn", "rtn"]})
    with pytest.raises(StudyError, match="recon_iters must be an integer >= 1"):
        StudyConfig.from_dict({**TINY, "ptq": {"recon_iters": 0}})
    with pytest.raises(StudyError, match="recon_range must be one of"):
        StudyConfig.from_dict({**TINY, "ptq": {"recon_range": "max"}})
    assert StudyConfig.from_dict({**TINY, "ptq": {"methods": ["qdrop"]}}).ptq["variants"] == ["qdrop"]


# ---------------------------------------------------------------- measurement keys (issue 13)
def _other(v):
    """A value of the same kind as ``v`` that differs from it."""
    import dataclasses

    if dataclasses.is_dataclass(v):
        f = dataclasses.fields(v)[0]
        return dataclasses.replace(v, **{f.name: _other(getattr(v, f.name))})
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "x"
    if v is None:
        return 1
    if isinstance(v, tuple):
        return v + (("x", 1),)
    raise AssertionError(f"no other value for {v!r}")


def _every_key():
    from landscape.study import MixedKey, SensitivityKey, measurement_keys, ptq_key

    cfg = StudyConfig.from_dict({**TINY, "ptq": ["rtn", "rtn+bn", "qdrop"], "mixed": {},
                                 "instruments": {**TINY["instruments"], "replicates": 2}})
    keys = dict(measurement_keys(cfg))
    keys["sensitivity:minmax"] = SensitivityKey(samples=128, batch=64, seed=0, bits=(2, 4), matvecs=8, range="minmax")
    for method in ("rtn+bn", "qdrop"):
        keys[f"mixed+{method}"] = MixedKey(ptq=ptq_key(cfg, "W8A4", method, "cpu", bits_by_layer={"1": 2, "3": 4}),
                                           sensitivity="abc", budget=2.5, kind="avg-bits", objective="hawq",
                                           tied=(("1", "2"),))
    return cfg, keys


def test_a_measurement_key_changes_with_every_field_and_is_frozen():
    import dataclasses

    _, keys = _every_key()
    assert {type(k).__name__ for k in keys.values()} >= {
        "AccuracyKey", "RoundingPTQKey", "ReconPTQKey", "TraceKey", "EigenKey", "SamplingKey", "DensityKey",
        "BlockTraceKey", "NoiseKey", "SurfaceKey", "SliceKey", "SensitivityKey", "MixedKey"}
    for name, key in keys.items():
        base = key.digest("train", name)
        assert base != key.digest("train2", name) and base != key.digest("train", name + "x")
        assert base == dataclasses.replace(key).digest("train", name)  # deterministic
        for f in dataclasses.fields(key):
            changed = dataclasses.replace(key, **{f.name: _other(getattr(key, f.name))})
            assert changed.digest("train", name) != base, (name, f.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(key, dataclasses.fields(key)[0].name, None)
        hash(key)  # hashable: every field frozen


def test_keys_hold_the_inputs_their_measurements_read():
    from landscape.study import measurement_keys

    cfg, keys = _every_key()
    d = cfg.to_dict()
    d["instruments"]["seed"] = 1
    other_seed = measurement_keys(StudyConfig.from_dict(d))
    for name in ("ptq:W4A4", "ptq+bn:W4A4", "ptq+qdrop:W4A4", "trace", "eigen", "sampling", "noise:W4A4", "surface"):
        assert keys[name].seed == 0 and other_seed[name].seed == 1
        assert other_seed[name].digest("t", name) != keys[name].digest("t", name), name
    d = cfg.to_dict()
    d["ptq"]["first_last_bits"] = 6
    other_flb = measurement_keys(StudyConfig.from_dict(d))
    for name in ("ptq:W4A4", "ptq+qdrop:W4A4", "noise:W4A4", "slice:W4A4"):
        assert other_flb[name] != keys[name], name
    assert other_flb["trace"] == keys["trace"]  # the trace does not read first_last_bits
    # replicates is a field of the sampling measurement's key only
    d = cfg.to_dict()
    d["instruments"]["replicates"] = 3
    more = measurement_keys(StudyConfig.from_dict(d))
    assert [n for n in keys if n in more and more[n] != keys[n]] == ["sampling"]
    assert "sampling" not in measurement_keys(StudyConfig.from_dict(TINY))


def test_a_hand_written_key_is_refused():
    from types import SimpleNamespace

    from landscape.study import Measure

    fake = SimpleNamespace(rec={"train_key": "k", "measurements": {}}, s=SimpleNamespace(_save=lambda r: None))
    with pytest.raises(TypeError, match="must be a MeasurementKey"):
        Measure._do(fake, "trace", {"m": "hutch++"}, lambda: 1.0)


# ---------------------------------------------------------------- sampling error (issue 13)
def test_replicates_are_validated_with_the_fix_named(tmp_path):
    for bad in (0, -1, 1.5, "2", True, None):
        with pytest.raises(StudyError, match="instruments.replicates must be an integer >= 1"):
            StudyConfig.from_dict({**TINY, "instruments": {**TINY["instruments"], "replicates": bad}})
    assert StudyConfig.from_dict(TINY).instruments.replicates == 1
    cfg = StudyConfig.from_dict({**TINY, "runs": [{"method": "sgd"}],
                                 "instruments": {**TINY["instruments"], "hessian_samples": 512, "replicates": 3}})
    with pytest.raises(StudyError, match=r"replicates 3 disjoint subsets .* need 1536 training images, but digits has "
                                         r"1150; lower replicates to at most 2 or hessian_samples to at most 383"):
        Study(cfg, tmp_path / "s", device="cpu", progress=False).check()
    assert not (tmp_path / "s").exists()


def test_training_subsets_are_disjoint_and_the_first_is_the_study_images():
    from dnq.data import load_dataset, training_batches
    from landscape.study import training_subsets

    ds = load_dataset("digits", val_size=287, val_seed=0)
    subsets = training_subsets(ds, 200, 5, 3, 64)
    sets = [set(idx.tolist()) for idx, _ in subsets]
    assert [len(s) for s in sets] == [200] * 5
    for a in range(5):
        for b in range(a + 1, 5):
            assert not sets[a] & sets[b], (a, b)
    for idx, batches in subsets:
        x = torch.cat([xb for xb, _ in batches])
        assert torch.equal(x, ds.normalize(ds.x_train[idx])) and [len(xb) for xb, _ in batches] == [64, 64, 64, 8]
    study_images = training_batches(ds, 200, 3, 64)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(subsets[0][1], study_images))
    with pytest.raises(ValueError, match="need 1200 training images, but digits has 1150"):
        training_subsets(ds, 400, 3, 0, 64)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    torch.set_num_threads(TEST_THREADS)
    out = tmp_path_factory.mktemp("sampled") / "s"
    cfg = StudyConfig.from_dict({**TINY, "name": "sampled", "runs": [{"method": "sgd"}], "seeds": [0, 1],
                                 "bits": ["W4A4"], "instruments": {**TINY["instruments"], "replicates": 3,
                                                                   "surface_steps": 2, "slice_steps": 3}})
    records = Study(cfg, out, device="cpu", progress=False).run()
    return cfg, out, records


def test_the_sampling_measurement_recomputes_the_curvature_on_each_subset(sampled):
    import statistics

    cfg, out, records = sampled
    for rec in records:
        m = rec["measurements"]
        s = m["sampling"]["value"]
        reps = s["replicates"]
        assert [r["replicate"] for r in reps] == [0, 1, 2] and all(r["images"] == 128 for r in reps)
        # subset 0 is the study's own images and settings: its trace and eigen measurements are reused
        assert reps[0]["reused"] == ["trace", "eigen"] and reps[1]["reused"] == reps[2]["reused"] == []
        assert reps[0]["trace"]["value"] == m["trace"]["value"]["value"]
        assert reps[0]["top_eigenvalue"]["value"] == m["eigen"]["value"]["eigenvalues"][0]
        assert reps[0]["trace"]["engines"] == m["trace"]["value"]["engines"]
        assert [r["trace"]["seed"] for r in reps] == [0, 1, 2]
        traces = [r["trace"]["value"] for r in reps]
        assert len(set(traces)) == 3 and all(t > 0 for t in traces)
        for r in reps:
            assert r["trace"]["std_error"] > 0 and r["trace"]["num_matvecs"] == cfg.instruments.trace_matvecs
            # the operator's engines ({name: vectors}) of each subset's own computation (subset 0: the study's)
            assert r["trace"]["engines"] and r["top_eigenvalue"]["engines"]
            assert all(isinstance(n, int) and n > 0 for n in r["trace"]["engines"].values())
            assert r["top_eigenvalue"]["residual_norm"] >= 0
        t = s["trace"]
        assert t["mean"] == pytest.approx(statistics.fmean(traces))
        assert t["std"] == pytest.approx(statistics.stdev(traces))
        assert t["relative_spread"] == pytest.approx(statistics.stdev(traces) / statistics.fmean(traces))
        assert t["min_max_ratio"] == pytest.approx(min(traces) / max(traces))
        ses = [r["trace"]["std_error"] for r in reps]
        assert t["mean_estimator_error"] == pytest.approx(statistics.fmean(ses))
        assert t["spread_to_error"] == pytest.approx(statistics.stdev(traces) / statistics.fmean(ses))
        eig = [r["top_eigenvalue"]["value"] for r in reps]
        assert s["top_eigenvalue"]["std"] == pytest.approx(statistics.stdev(eig))


def test_changing_replicates_redoes_only_the_sampling_measurement(sampled, tmp_path):
    cfg, out, records = sampled
    other = shutil.copytree(out, tmp_path / "copy")
    d = cfg.to_dict()
    d["instruments"]["replicates"] = 2
    Study(StudyConfig.from_dict(d), other, device="cpu", progress=False).run()
    for before, after in zip(records, load_records(other)):
        for name, m in after["measurements"].items():
            assert (m["at"] == before["measurements"][name]["at"]) == (name != "sampling"), name
        assert len(after["measurements"]["sampling"]["value"]["replicates"]) == 2
        # the same images and seeds give the same numbers
        assert after["measurements"]["sampling"]["value"]["replicates"][1]["trace"]["value"] == pytest.approx(
            before["measurements"]["sampling"]["value"]["replicates"][1]["trace"]["value"], rel=1e-6)


def _fake_record(rid, config, seed, traces, ses, eigs, res):
    reps = [{"replicate": i, "images": 64, "trace": {"value": t, "std_error": s},
             "top_eigenvalue": {"value": e, "residual_norm": r}}
            for i, (t, s, e, r) in enumerate(zip(traces, ses, eigs, res))]
    return {"id": rid, "name": rid, "config": config, "settings": {"seed": seed},
            "measurements": {"sampling": {"key": "k", "value": {"replicates": reps}}}}


def test_the_sampling_section_pools_subsets_per_configuration(tmp_path):
    import statistics

    from landscape.report_sampling import COLUMNS, config_rows, section

    a = ([10.0, 12.0, 11.0], [0.5, 0.7, 0.6], [3.0, 3.5, 3.2], [0.01, 0.02, 0.03])
    b = ([14.0, 13.0, 16.0], [0.4, 0.5, 0.9], [4.0, 3.0, 3.7], [0.02, 0.02, 0.05])
    c = ([5.0, 6.0, 5.5], [0.1, 0.2, 0.3], [1.0, 1.1, 1.2], [0.0, 0.01, 0.02])
    records = [_fake_record("x-s0", "x", 0, *a), _fake_record("x-s1", "x", 1, *b), _fake_record("y-s0", "y", 0, *c),
               {"id": "z-s0", "config": "z", "settings": {}, "measurements": {"trace": {"value": {}}}}]
    rows = config_rows(records)
    assert [r["config"] for r in rows] == ["x", "y"]  # z has no sampling measurement
    x, y = rows
    mean_x = statistics.fmean([statistics.fmean(a[0]), statistics.fmean(b[0])])
    pooled_x = ((statistics.variance(a[0]) + statistics.variance(b[0])) / 2) ** 0.5
    se_x = statistics.fmean(a[1] + b[1])
    assert x["models"] == 2 and x["subsets"] == 3 and x["images"] == 64
    assert x["trace_mean"] == pytest.approx(mean_x) and x["trace_between_std"] == pytest.approx(pooled_x)
    assert x["trace_relative_spread_pct"] == pytest.approx(100 * pooled_x / mean_x)
    assert x["trace_mean_se"] == pytest.approx(se_x) and x["trace_std_to_se"] == pytest.approx(pooled_x / se_x)
    assert x["trace_seed_std"] == pytest.approx(statistics.stdev([statistics.fmean(a[0]), statistics.fmean(b[0])]))
    pooled_e = ((statistics.variance(a[2]) + statistics.variance(b[2])) / 2) ** 0.5
    assert x["eig_between_std"] == pytest.approx(pooled_e)
    assert x["eig_mean_residual"] == pytest.approx(statistics.fmean(a[3] + b[3]))
    assert y["trace_between_std"] == pytest.approx(statistics.stdev(c[0])) and y["trace_seed_std"] is None
    assert y["eig_std_to_residual"] == pytest.approx(statistics.stdev(c[2]) / statistics.fmean(c[3]))
    parts = section(records, tmp_path)
    assert "id='sampling'" in parts[0] and "<td class='l'>x</td>" in parts[-1]
    with open(tmp_path / "sampling.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == [c for c, _ in COLUMNS] and [r["config"] for r in got] == ["x", "y"]
    assert float(got[0]["trace_between_std"]) == pytest.approx(pooled_x)
    assert section(records[3:], tmp_path / "none") == [] and not (tmp_path / "none").exists()


def test_the_report_has_the_sampling_section_only_with_replicates(sampled, report, tmp_path):
    from landscape.report import build
    from landscape.report_sampling import config_rows

    _, out, records = sampled
    assert "id='sampling'" not in report.read_text() and not (report.parent / "sampling.csv").exists()
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    text = build(out, tmp_path / "r.html", static=False, n_boot=50).read_text()
    assert "id='sampling'" in text
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # a report elsewhere: study untouched
    with open(tmp_path / "sampling.csv") as f:
        got = list(csv.DictReader(f))
    want = config_rows(load_records(out))
    assert len(got) == len(want) == 1 and got[0]["models"] == "2"
    assert float(got[0]["trace_mean"]) == pytest.approx(want[0]["trace_mean"])
