"""Issue 23 in the study: the quantization convention of its PTQ (config, keys that keep the
digests of earlier studies, records, study.json, the report's header), runs with their own
``train_bits``, the ``paper`` preset end to end on CIFAR-100-shaped synthetic data, the published
anchors of the report's grid, ``landscape study --plan`` and the message for a missing CIFAR-100."""

import dataclasses
import json
import re
import shutil

import pytest

from landscape.study import (
    MixedKey,
    ReconPTQKey,
    RoundingPTQKey,
    Study,
    StudyError,
    load_config,
    measurement_keys,
)

# the preset at a size a CPU test can run: CIFAR-100-shaped random images, resnet20 (the paper convention knows it)
# instead of resnet18, one seed, one bit-width, one epoch, 2 reconstruction steps from min-max ranges (the preset's
# MSE search is dnq's, tested there), tiny instruments
TINY_PAPER = dict(data="synthetic:100:200:32", model="resnet20", seeds=[0], bits=["W4A4"],
                  train={"epochs": 1, "batch_size": 64, "device": "cpu"},
                  ptq={"recon_iters": 2, "recon_calib_size": 32, "recon_range": "minmax"},
                  instruments={"hessian_samples": 16, "hessian_batch": 16, "trace_matvecs": 6, "eig_k": 1,
                               "eig_tol": 1e-1, "density_runs": 1, "density_steps": 3, "block_matvecs": 2,
                               "noise_matvecs": 2, "surface_steps": 2, "slice_steps": 3})


# ---------------------------------------------------------------- keys and hashes of earlier studies
def test_the_default_convention_keeps_the_digests_of_earlier_studies():
    # digests computed with the code before conventions existed (commit 58994a1)
    r = RoundingPTQKey(bits="W4A4", method="rtn", seed=0, calib_size=256, first_last_bits=8, range="minmax",
                       bits_by_layer=None)
    q = ReconPTQKey(bits="W2A4", method="qdrop", seed=0, calib_size=1024, batch_size=32, iters=500,
                    first_last_bits=8, range="mse", bits_by_layer=None)
    m = MixedKey(ptq=RoundingPTQKey(bits="W8A4", method="rtn+bn", seed=0, calib_size=256, first_last_bits=8,
                                    range="minmax", bits_by_layer=(("1", 2), ("3", 4))),
                 sensitivity="abc", budget=2.5, kind="avg-bits", objective="hawq", tied=())
    assert r.convention == q.convention == "dnq" and q.lr_rule is None
    assert r.digest("TRAINKEY", "ptq:W4A4") == "bf3c7f291646498e"
    assert q.digest("TRAINKEY", "ptq+qdrop:W2A4") == "b160e586626825d8"
    assert m.digest("TRAINKEY", "mixed+rtn+bn:avg-bits=2.5:hawq") == "afdcc41ea2903983"
    # the presets' hashes (study.json) and the keys of their measurements are those of before
    assert load_config("digits").hash() == "8046c6711ead14a0"
    assert load_config("cifar10-subset").hash() == "1b9923f08c144968"
    cfg = load_config("cifar10-subset")
    assert measurement_keys(cfg, "cpu")["ptq+qdrop:W4A4"].digest("t", "n") == dataclasses.replace(
        measurement_keys(cfg, "cpu")["ptq+qdrop:W4A4"], convention="dnq", lr_rule=None).digest("t", "n")


def test_a_changed_convention_or_learning_rate_rule_changes_the_ptq_keys_only():
    base = load_config("cifar10-subset", mixed=None)  # mixed precision is refused under the paper convention
    paper = load_config("cifar10-subset", ptq={"convention": "paper"}, mixed=None)
    scaled = load_config("cifar10-subset", ptq={"recon_lr_rule": "paper"}, mixed=None)
    k0, k1, k2 = (measurement_keys(c, "cpu") for c in (base, paper, scaled))
    for name in k0:
        d0, d1, d2 = (k[name].digest("t", name) for k in (k0, k1, k2))
        if name.startswith("ptq"):
            assert d1 != d0, name  # every PTQ method reads the convention
        else:
            assert d1 == d0, name  # nothing else does
        assert (d2 != d0) == name.startswith("ptq+qdrop"), name  # the rule: reconstructions only
    assert k1["ptq:W4A4"].convention == "paper" and k2["ptq+qdrop:W4A4"].lr_rule == "paper"
    assert paper.hash() != base.hash() != scaled.hash()
    assert base.to_dict()["ptq"]["convention"] == "dnq" and base.to_dict()["ptq"]["recon_lr_rule"] is None


def test_convention_and_run_bits_are_validated_with_the_fix_named():
    with pytest.raises(StudyError, match=r"ptq.convention must be one of dnq, paper .*got 'papers'"):
        load_config("digits", ptq={"convention": "papers"})
    with pytest.raises(StudyError, match=r"ptq.recon_lr_rule must be null .*'paper' or 'scaled'.*got 'fixed'"):
        load_config("digits", ptq={"recon_lr_rule": "fixed"})
    with pytest.raises(StudyError, match=r"run 1: train_bits must be a bit-width such as \"W4A4\".*got 'W4'"):
        load_config("digits", runs=[{"method": "sgd"}, {"method": "dnq", "train_bits": ["W4A4", "W4"]}])
    with pytest.raises(StudyError, match=r"run 0: train_bits sets the target bits; remove \['wbits'\]"):
        load_config("digits", runs=[{"method": "dnq", "train_bits": "W2A2", "wbits": 2}])
    with pytest.raises(StudyError, match=r"mixed precision is defined under the dnq convention only.*mixed=null"):
        load_config("paper", mixed={})
    with pytest.raises(StudyError, match=r"unknown training settings \['bits'\]"):
        load_config("digits", runs=[{"method": "dnq", "bits": "W2A2"}])


def test_a_run_of_its_own_train_bits_trains_for_them_and_other_runs_keep_their_ids():
    cfg = load_config("paper")
    ids = [r["id"] for r in cfg.expand()]
    assert ids[:3] == ["sgd-s0", "sgd-s1", "sgd-s2"] and len(ids) == 12
    assert ids[3:6] == ["dnq-lam1-W4A4-s0", "dnq-lam1-W4A4-s1", "dnq-lam1-W4A4-s2"]
    assert {r["config"] for r in cfg.expand()} == {"sgd", "dnq-lam1-W4A4", "dnq-lam1-W2A4", "dnq-lam1-W2A2"}
    study = Study(cfg, "unused", device="cpu", progress=False)
    for r in cfg.expand():
        tc = study.train_config(r["settings"], "x")
        want = r["settings"].get("train_bits", cfg.train_bits)
        assert f"W{tc.wbits}A{tc.abits}" == want and not hasattr(tc, "train_bits")
    assert cfg.ptq["convention"] == "paper" and cfg.ptq["variants"] == ["rtn", "rtn+bn", "qdrop"]
    assert (cfg.model, cfg.data, cfg.seeds, cfg.bits) == ("resnet18", "cifar100", [0, 1, 2], ["W4A4", "W2A4", "W2A2"])
    # the earlier presets' ids and training keys are those of before (computed with commit 58994a1)
    for preset, rid, tkey in (("digits", "dnq-lam0.5-s0", "4e41648b22c757ca"),
                              ("cifar10-subset", "dnq-lam1-s0", "81410a45f3b14221")):
        c = load_config(preset)
        r = c.expand()[2]
        assert r["id"] == rid and Study(c, "unused", device="cpu").train_key(r["settings"]) == tkey


# ---------------------------------------------------------------- the paper preset end to end
@pytest.fixture(scope="module")
def paper_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "study"
    cfg = load_config("paper", **TINY_PAPER)
    records = Study(cfg, out, device="cpu", progress=False).run()
    return cfg, out, records


def test_the_paper_preset_runs_under_the_paper_convention_and_records_it(paper_study):
    cfg, out, records = paper_study
    assert [r["id"] for r in records] == ["sgd-s0", "dnq-lam1-W4A4-s0", "dnq-lam1-W2A4-s0", "dnq-lam1-W2A2-s0"]
    meta = json.loads((out / "study.json").read_text())
    assert meta["config"]["ptq"]["convention"] == "paper" and meta["convention"]["convention"] == "paper"
    for rec in records:
        trained = json.loads((out / rec["run_dir"] / "config.json").read_text())
        assert f"W{trained['wbits']}A{trained['abits']}" == rec["settings"].get("train_bits", "W4A4")
        for b in cfg.bits:
            for name in (f"ptq:{b}", f"ptq+bn:{b}", f"ptq+qdrop:{b}"):
                v = rec["measurements"][name]["value"]
                assert v["convention"] == "paper" and v["convention_details"]["convention"] == "paper", name
                assert 0 <= v["test_acc"] <= 1
            assert rec["measurements"][f"ptq+qdrop:{b}"]["value"]["recon_iters"] == 2


def test_the_report_names_the_convention_and_shows_published_anchors_only_where_they_apply(paper_study, tmp_path):
    from landscape.report import build

    _, out, _ = paper_study
    html = build(out, static=False, n_boot=50).read_text()
    header = re.search(r"<p class='note' id='ptq-settings'>(.*?)</p>", html, re.S).group(1)
    assert header.startswith("Quantization convention: paper (BRECQ") and "2^b levels" in header
    assert "the papers&#x27; fixed learning rates" in header or "the papers' fixed learning rates" in header
    assert "(published)" not in html  # synthetic data: no published table applies
    # the same study as the real preset names it (CIFAR-100, resnet18): the published figures beside ours
    real = tmp_path / "real"
    shutil.copytree(out, real)
    meta = json.loads((real / "study.json").read_text())
    meta["config"].update(data="cifar100", model="resnet18")
    (real / "study.json").write_text(json.dumps(meta))
    html = build(real, static=False, n_boot=50).read_text()
    grid = html.split("<h2 id='grid'>", 1)[1].split("<h2", 1)[0]
    table = grid.split("<h3 id='grid-W4A4'>", 1)[1]
    heads = re.findall(r"<th class='anchor'>(.*?)</th>", table)
    assert heads == ["FP (published)", "AdaRound (published)", "BRECQ (published)", "QDrop (published)"]
    assert re.findall(r"<td class='anchor' rowspan='4'>(.*?)</td>", table) == ["79.40", "77.46", "77.61", "77.79"]
    assert "DNQ&#x27;s authors&#x27; follow-up" in grid or "DNQ's authors' follow-up" in grid
    summary = json.loads((real / "summary.json").read_text())
    assert summary["published_anchors"]["bits"] == {"W4A4": {"adaround": 77.46, "brecq": 77.61, "qdrop": 77.79}}
    # a study with other bit-widths shows those the published table has, and only those
    from landscape.report import anchors_for

    two = anchors_for({"data": "cifar100", "model": "resnet18", "bits": ["W2A2", "W3A3"]})
    assert two["bits"] == {"W2A2": {"adaround": 70.70, "brecq": 72.13, "qdrop": 72.29}} and two["fp"] == 79.40
    assert anchors_for({"data": "cifar100", "model": "resnet20", "bits": ["W4A4"]}) is None
    assert anchors_for({"data": "cifar100", "model": "resnet18", "bits": ["W3A3"]}) is None
    grid_csv = (real / "grid.csv").read_text()
    assert "published" not in grid_csv and "77.79" not in grid_csv  # never mixed into our numbers
    assert all(r["FP"]["mean"] < 0.5 for r in summary["training_by_ptq"]["W4A4"])  # ours: random labels


# ---------------------------------------------------------------- the plan
def _stage(plan, prefix):
    found = [s for s in plan.stages if s.name.startswith(prefix)]
    assert len(found) == 1, (prefix, [s.name for s in plan.stages])
    return found[0]


def _fake_timings(monkeypatch):
    """Constant unit costs in place of the timings (for the tests of the plan's counting alone)."""
    import landscape.study.plan as plan

    monkeypatch.setattr(plan, "time_training", lambda tc, shape, device: {
        "step_s": 0.1, "epoch_start_s": 0.2, "checkpoint_s": 0.01, "bn_batch_s": 0.05, "mode": "eager", "amp": False})
    monkeypatch.setattr(plan, "time_evaluation", lambda model, shape, device: 1e-4)
    monkeypatch.setattr(plan, "time_rounding", lambda cfg, shape, device, method, bits: {
        "ptq_s": 0.5, "eval_image_s": 2e-4})
    monkeypatch.setattr(plan, "time_reconstruction", lambda cfg, shape, device, method, bits, iters: {
        "steps": 11 * iters, "step_s": 0.01, "fixed_s": 1.0, "units": 11, "eval_image_s": 2e-4})
    monkeypatch.setattr(plan, "time_curvature", lambda cfg, shape, device: {
        "matvec_s": 0.02, "block_s": 0.015, "form_s": 0.01, "loss_s": 0.005, "grad_s": 0.01, "setup_s": 0.3,
        "dim": 1000, "layers": 22, "batch": 32, "timed_images": 32})


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    from landscape.study.plan import make_plan

    out = tmp_path_factory.mktemp("plan") / "not-yet"
    return make_plan(load_config("paper", **TINY_PAPER), out, device="cpu"), out


def test_the_plan_times_and_counts_every_stage_of_the_config_and_writes_nothing(tiny_plan):
    from landscape.study.plan import format_plan

    plan, out = tiny_plan
    assert not out.exists()
    steps = (200 - 20) // 64  # 180 training images after the automatic 10% validation split, batch 64
    assert plan.splits == {"train": 180, "val": 20, "test": 40} and plan.models == 4
    assert _stage(plan, "train sgd: steps").count == 1 * 1 * steps
    assert _stage(plan, "train dnq: steps").count == 3 * 1 * steps  # one dnq model per train_bits
    assert _stage(plan, "train dnq: per epoch").count == 3
    assert _stage(plan, "train: end").count == 4
    assert _stage(plan, "fp evaluation").count == 4
    for m in ("rtn", "rtn+bn"):
        assert _stage(plan, f"ptq {m}: quantize").count == 4 * 1  # models x bit-widths
    units = plan.costs["ptq qdrop"]["units"]
    assert units == 11  # resnet20: the first convolution, 9 residual blocks, the classifier
    assert _stage(plan, "ptq qdrop: reconstruction steps").count == pytest.approx(4 * 1 * units * 2)
    assert _stage(plan, "ptq qdrop: caches").count == 4 * 1
    for name, n in (("trace (hutch++, 6 products)", 4), ("eigen (k 1", 4), ("density (1 x 3 products)", 4),
                    ("blocks (2 products)", 4), ("noise (2 products", 4 * 1), ("surface (2 x 2 losses)", 4),
                    ("slice (3 losses)", 4 * 1)):
        assert _stage(plan, name).count == n, name
    assert sorted(k for k in plan.costs if k.startswith("train")) == ["train dnq batch 64", "train sgd batch 64"]
    assert plan.costs["train dnq batch 64"]["mode"] == "eager" and plan.costs["train sgd batch 64"]["step_s"] > 0
    assert all(s.unit_s > 0 for s in plan.stages if not s.name.startswith("curvature: engine"))
    assert plan.total_s == pytest.approx(sum(s.seconds for s in plan.stages)) and plan.total_s > 0
    text = format_plan(plan)
    for s in plan.stages:
        assert s.name in text
    assert re.search(r"^total\s+\S", text, re.M)


def test_the_plan_of_a_finished_study_leaves_out_what_is_done(paper_study, monkeypatch):
    from landscape.study.plan import make_plan

    _fake_timings(monkeypatch)
    cfg, out, _ = paper_study
    before = sorted(p.name for p in out.rglob("*"))
    plan = make_plan(cfg, out, device="cpu")
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written
    for s in plan.stages:
        if not s.name.startswith("report"):
            assert s.count == 0 and s.done > 0, s.name
    assert _stage(plan, "train dnq: steps").how.endswith("3 models done")
    more = load_config("paper", **{**TINY_PAPER, "ptq": {**TINY_PAPER["ptq"], "recon_iters": 3}})
    plan = make_plan(more, out, device="cpu")  # a changed budget: only the reconstructions again
    assert _stage(plan, "ptq qdrop: reconstruction steps").count == 4 * 1 * 11 * 3
    assert _stage(plan, "trace").count == 0 and _stage(plan, "train sgd: steps").count == 0
    assert _stage(plan, "ptq rtn: quantize").count == 0


def test_the_plan_from_the_command_line(tmp_path, capsys, monkeypatch):
    from landscape.cli import main

    _fake_timings(monkeypatch)
    args = ["study", "--preset", "paper", "--quiet", "--device", "cpu"]
    for k, v in (("data", TINY_PAPER["data"]), ("model", "resnet20"), ("seeds", "[0]"), ("bits", '["W4A4"]'),
                 ("train", json.dumps(TINY_PAPER["train"])), ("ptq", json.dumps(TINY_PAPER["ptq"])),
                 ("instruments", json.dumps(TINY_PAPER["instruments"]))):
        args += ["--set", f"{k}={v}"]
    assert main([*args, "--plan", "--plan-json", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "plan of study 'paper' on cpu: resnet20" in text and re.search(r"^total\s+\S", text, re.M)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["total_s"] == pytest.approx(sum(s["seconds"] for s in saved["stages"]))
    # 4 models x 2 steps per epoch x 0.1 s, ... : the constant costs times the counts
    assert next(s for s in saved["stages"] if s["stage"] == "train sgd: steps")["seconds"] == pytest.approx(0.2)
    assert list(tmp_path.iterdir()) == [tmp_path / "plan.json"]
    assert main(args) == 2 and "give --out FOLDER" in capsys.readouterr().err
    assert main([*args, "--plan", "--plan-json", str(tmp_path / "no" / "p.json")]) == 2
    assert "give a file name in an existing folder" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--plan-json", "p.json"]) == 2
    assert "give --plan with it" in capsys.readouterr().err


# ---------------------------------------------------------------- a missing CIFAR-100
def test_a_missing_cifar100_is_one_line_with_the_folder_the_flag_and_the_npz_alternative(tmp_path):
    from dnq.data import DataError, load_dataset

    root = tmp_path / "nothing-here"
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", str(root))
    msg = str(e.value)
    assert "\n" not in msg
    assert str(root / "cifar-100-python") in msg and "--download" in msg and "npz:PATH" in msg
    assert not root.exists()  # nothing downloaded, no folder made
    study = Study(load_config("paper", data_root=str(root)), tmp_path / "s", device="cpu", progress=False)
    with pytest.raises(StudyError) as e:
        study.check()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run 'sgd-s0': cannot load dataset 'cifar100': cifar100 not found")
    assert "--set data_root=PATH" in msg and "--set data=npz:PATH" in msg and str(root) in msg
    assert not (tmp_path / "s").exists()
