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
    torch.set_num_threads(2)
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
            assert all(0 <= m[k]["value"][f"{s}_acc"] <= 1 for k in (f"ptq:{b}", f"ptq+bn:{b}") for s in ("val", "test"))
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
            same = m["at"] == before[rid]["measurements"][name]["at"] and m["key"] == before[rid]["measurements"][name]["key"]
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
        assert first is not None, f"the study never finished a trace: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
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
    toml.write_text('name = "t"\nseeds = [0, 1]\n[train]\nepochs = 3\n[[runs]]\nmethod = "sam"\nsam_rho = [0.05, 0.1]\n')
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
    import dnq.recon

    cfg = StudyConfig.from_dict({**TINY, "name": "recon", "runs": [{"method": "sgd"}], "bits": ["W4A4", "W2A4"],
                                 "ptq": ["rtn", "qdrop", "adaround"],
                                 "instruments": {**TINY["instruments"], "surface_steps": 2, "slice_steps": 3}})
    assert cfg.ptq["variants"] == ["rtn", "qdrop", "adaround"] and cfg.ptq["recon_calib_size"] == 1024
    cfg = StudyConfig.from_dict({**cfg.to_dict(), "ptq": {**cfg.ptq, "recon_iters": 4, "recon_calib_size": 64}})
    calls = []
    original = dnq.recon.reconstruct
    monkeypatch.setattr(dnq.recon, "reconstruct", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
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
