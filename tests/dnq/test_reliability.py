"""Issue 10, the dnq side: every bad input to `dnq train` and `dnq ptq` gets one line on stderr and
exit code 2 and leaves the file system as it was; run folders are locked; --overwrite removes
only what the toolkit wrote, after every check, and a failed replacement keeps the old run."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dnq.cli import main
from tests.conftest import ROOT, run_dnq

FAST = ["--data", "digits", "--model", "cnn-digits", "--quiet"]


def tree(root: Path) -> dict:
    """Every entry under ``root`` with its size and modification time (what 'unchanged' means)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (copied per test where it is modified)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _npz(path: Path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), "y_train": rng.integers(0, 3, 64),
              "x_test": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), "y_test": rng.integers(0, 3, 16)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _bad_files(d: Path) -> dict:
    """The corrupt / malformed inputs, made once per test in ``d``."""
    d.mkdir(exist_ok=True)
    files = {}
    (d / "empty.npz").write_bytes(b"")
    files["empty"] = d / "empty.npz"
    good = _npz(d / "good.npz")
    files["truncated"] = d / "truncated.npz"
    files["truncated"].write_bytes(good.read_bytes()[:200])
    files["2d_labels"] = _npz(d / "2d.npz", y_train=np.zeros((64, 3), np.int64))
    files["float_labels"] = _npz(d / "float.npz", y_train=np.full(64, 0.5))
    files["huge_label"] = _npz(d / "huge.npz", y_train=np.r_[np.zeros(63, np.int64), [100000]])
    files["empty_arrays"] = _npz(d / "emptyarr.npz", x_train=np.zeros((0, 8, 8, 3), np.uint8),
                                 y_train=np.zeros(0, np.int64))
    files["empty_test"] = _npz(d / "emptytest.npz", x_test=np.zeros((0, 8, 8, 3), np.uint8),
                               y_test=np.zeros(0, np.int64))
    files["float_images"] = _npz(d / "floatimg.npz", x_train=np.zeros((64, 8, 8, 3), np.float32))
    files["missing_array"] = _npz(d / "missing.npz", y_test=None)
    files["one_class"] = _npz(d / "oneclass.npz", y_train=np.zeros(64, np.int64))
    return files


TRAIN_CASES = [
    # (extra args, needles in the one-line message)
    (["--model", "resnet9"], ["unknown model"]),
    (["--method", "adamw"], ["unknown method"]),
    (["--data", "mnist"], ["unknown dataset"]),
    (["--data", "npz:missing.npz"], ["not found"]),
    (["--device", "tpu"], ["unknown device"]),
    (["--device", "cuda:x"], ["unknown device"]),
    (["--out", ""], ["--out is empty"]),
    (["--resume"], ["no checkpoint.pt"]),
    (["--resume", "--overwrite"], ["exclude each other"]),
    (["--batch-size", "5000"], ["batch size 5000", "training images"]),
    (["--val-size", "99999"], ["val_size 99999"]),
    (["--val-size", "1.5"], ["val_size"]),
    (["--val-size", "-1"], ["val_size"]),
    (["--val-size", "lots"], ["--val-size"]),
]
# every numeric flag: a wrong type, and out-of-range / non-finite values
for flag, bad in [("--epochs", ["-1", "0"]), ("--batch-size", ["0"]), ("--lr", ["0", "-1", "nan", "inf"]),
                  ("--momentum", ["1", "nan"]), ("--weight-decay", ["-1", "nan"]), ("--label-smoothing", ["1"]),
                  ("--lr-warmup-epochs", ["-1"]), ("--lambda-max", ["-1", "nan", "inf"]), ("--lambda-start", ["-1"]),
                  ("--lambda-warmup", ["-1"]), ("--ema-beta", ["1", "nan"]), ("--temperature", ["0", "inf"]),
                  ("--act-rho", ["-1", "inf"]), ("--first-last-bits", ["1", "9"]), ("--noise-first-last-bits", ["9"]),
                  ("--calib-size", ["0"]), ("--sam-rho", ["0", "nan"]), ("--swa-start", ["0", "1", "nan"]),
                  ("--val-seed", ["-1"]), ("--seed", ["-1"]), ("--eval-batch-size", ["0"]), ("--wbits", ["1", "9"]),
                  ("--abits", ["1", "9"])]:
    TRAIN_CASES.append(([flag, "x"], [flag]))
    for v in bad:
        TRAIN_CASES.append(([flag, v], [flag.lstrip("-").replace("-", "_")[:6]]))
TRAIN_CASES.append((["--act-sampler", "x"], ["--act-sampler"]))
if not torch.cuda.is_available():
    TRAIN_CASES.append((["--device", "cuda"], ["CUDA is not available"]))


def _one_line_refusal(capsys, argv, needles, root) -> tuple[str, str]:
    """Run ``dnq argv``; returns what is wrong with its refusal (empty when it is clean: exit code
    2, one line on stderr naming every needle, and ``root`` unchanged), and the message."""
    before = tree(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if len(lines) != 1 or "Traceback" in err:
        problems.append(f"{len(lines)} lines")
    problems += [f"no {n!r}" for n in needles if n.lower() not in err.lower()]
    # a private name (a function's, a field's) means nothing to a user
    internal = re.findall(r"(?<![\w/.-])_[a-z]\w*", err)
    if internal:
        problems.append(f"internal names {internal}")
    if tree(root) != before:
        problems.append("the file system changed")
    return "; ".join(problems), err


@pytest.mark.parametrize("args, needles", TRAIN_CASES, ids=[" ".join(a) or "empty" for a, _ in TRAIN_CASES])
def test_every_bad_train_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, needles):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "1", *out, *args], needles, tmp_path)
    assert not bad, (bad, err)


NPZ_CASES = [("empty", "empty"), ("truncated", "cannot be read"), ("2d_labels", "one integer per image"),
             ("float_labels", "non-integer"), ("huge_label", "distinct labels"), ("empty_arrays", "empty"),
             ("empty_test", "empty"), ("float_images", "uint8"), ("missing_array", "missing arrays"),
             ("one_class", "at least 2 classes")]


@pytest.mark.parametrize("kind, needle", NPZ_CASES, ids=[k for k, _ in NPZ_CASES])
def test_malformed_npz_files_are_refused_in_one_line(tmp_path, monkeypatch, capsys, kind, needle):
    files = _bad_files(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    bad, err = _one_line_refusal(capsys, ["train", "--data", f"npz:{files[kind]}", "--model", "cnn-digits", "--quiet",
                               "--batch-size", "8", "--out", str(tmp_path / "run")], [needle], tmp_path)
    assert not bad, (bad, err)


def test_an_unreadable_model_is_named_a_permission_problem(tmp_path, capsys, finished, monkeypatch):
    """Root reads any file, so the denial is simulated where the toolkit opens the file."""
    import dnq.rundir

    run = _copy_run(finished, tmp_path / "run")

    def denied(path, map_location="cpu"):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(dnq.rundir, "safe_load", denied)
    bad, err = _one_line_refusal(capsys, ["ptq", str(run), "--quiet"], ["model.pt", "permission denied", "chmod"],
                                 tmp_path)
    assert not bad, (bad, err)
    assert "truncated" not in err and "--overwrite" not in err  # the wrong fix of before


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """A finished run trained on an npz file (which the tests then move)."""
    d = tmp_path_factory.mktemp("npzrun")
    data = _npz(d / "data.npz")
    out = d / "run"
    assert main(["train", "--data", f"npz:{data}", "--model", "cnn-digits", "--epochs", "1", "--batch-size", "16",
                 "--quiet", "--out", str(out)]) == 0
    return data, out


def test_ptq_data_overrides_a_moved_dataset_after_checking_its_content(tmp_path, capsys, npz_run):
    data, run0 = npz_run
    run = _copy_run(run0, tmp_path / "run")
    moved = tmp_path / "elsewhere.npz"
    shutil.copy(data, moved)
    gone = tmp_path / "gone"
    meta_data = f"npz:{gone}"
    blob = torch.load(run / "model.pt", weights_only=True)
    blob["meta"]["data"] = meta_data  # the file the run was trained on is no longer there
    torch.save(blob, run / "model.pt")
    bad, err = _one_line_refusal(capsys, ["ptq", str(run), "--quiet"], ["cannot be loaded", "--data npz:"], tmp_path)
    assert not bad, (bad, err)
    other = _npz(tmp_path / "other.npz", y_test=np.r_[np.zeros(15, np.int64), [2]])
    bad, err = _one_line_refusal(capsys, ["ptq", str(run), "--quiet", "--data", f"npz:{other}"],
                                 ["other data than the run was trained on"], tmp_path)
    assert not bad, (bad, err)
    assert main(["ptq", str(run), "--quiet", "--data", f"npz:{moved}", "--bits", "W8A8", "--range", "minmax"]) == 0
    report = json.loads((run / "ptq.json").read_text())
    want = json.loads((run0 / "result.json").read_text())
    assert report["fp"]["test_acc"] == pytest.approx(want["test_acc"], abs=1e-9)


def test_run_folders_load_in_one_call(npz_run):
    from dnq import load_run

    data, run_dir = npz_run
    run = load_run(run_dir)
    batches = run.batches("train", samples=40, batch_size=16)
    assert [len(y) for _, y in batches] == [16, 16, 8]
    assert batches[0][0].dtype == torch.float32 and abs(float(batches[0][0].mean())) < 1.0  # normalized
    with torch.no_grad():
        out = run.model(batches[0][0])
    assert out.shape == (16, run.meta["num_classes"]) and float(run.loss_fn(out, batches[0][1])) > 0
    mean, var = run.weight_noise("W4A4")
    mods = dict(run.model.named_modules())
    for name, v in var.items():
        w = mods[name.rsplit(".", 1)[0]].weight
        assert v.shape == (w.shape[0],) and bool((v >= 0).all())
    # the first and last layers at 8 bits: a smaller error than the 4-bit layers'
    order = list(var)
    assert float(var[order[0]].mean()) < float(var[order[1]].mean())
    assert len(run.batches("test", samples=None)) == 1 and run.config.get("data", "").startswith("npz:")


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _evil_pickle() -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    buf = io.BytesIO()
    torch.save({"epoch": 0, "x": Evil()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("damage, needle", [("truncate", "cannot be read"), ("zero", "is empty"),
                                            ("evil", "unsafe"), ("foreign", "not a dnq train checkpoint")])
def test_a_damaged_checkpoint_names_the_file_and_the_way_out(tmp_path, monkeypatch, capsys, finished, damage, needle):
    run = _copy_run(finished, tmp_path / "run")
    ck = run / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes({"truncate": data[: len(data) // 2], "zero": b"", "evil": _evil_pickle(),
                    "foreign": _tensor_file({"w": torch.zeros(3)})}[damage])
    monkeypatch.chdir(tmp_path)
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "2", "--out", str(run), "--resume"],
                                 [needle, "checkpoint.pt"], tmp_path)
    assert not bad, (bad, err)
    assert "weights_only=False" not in err and "--overwrite" in err
    assert not (tmp_path / "PWNED").exists()


def _tensor_file(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


PTQ_CASES = [(["--bits", "W1A8"], ["2..8"]), (["--bits", "junk"], ["bad bit setting"]), (["--range", "kl"], ["minmax"]),
             (["--weight-mode", "x"], ["--weight-mode"]), (["--first-last-bits", "9"], ["2..8"]),
             (["--calib-size", "0"], ["calib_size"]), (["--calib-size", "x"], ["--calib-size"]),
             (["--device", "tpu"], ["unknown device"]), (["--seed", "x"], ["--seed"]),
             (["--mixed", "avg_bits=3"], ["bad budget"]), (["--mixed", "avg-bits=-2"], ["positive"]),
             (["--mixed", "avg-bits=3", "--objective", "curv"], ["unknown objective", "hawq"]),
             (["--mixed", "avg-bits=3", "--abits", "9"], ["2..8"]),
             (["--mixed", "avg-bits=3", "--sensitivity", "/nonexistent/s.json"], ["does not exist"]),
             (["--mixed", "avg-bits=3", "--weight-mode", "asymmetric"], ["symmetric"])]
if not torch.cuda.is_available():
    PTQ_CASES.append((["--device", "cuda"], ["CUDA is not available"]))


# every flag of dnq export with a bad value (or a bad combination): one line, nothing written
EXPORT_CASES = [(["--bits", "junk"], ["bad bit setting"]), (["--bits", "W4A4,W2A4"], ["one bit setting"]),
                (["--method", "gptq"], ["--method", "qdrop"]), (["--range", "kl"], ["--range", "minmax"]),
                (["--convention", "x"], ["--convention"]), (["--lr-rule", "x"], ["--lr-rule"]),
                (["--weight-mode", "x"], ["--weight-mode"]), (["--first-last-bits", "9"], ["2..8"]),
                (["--calib-size", "0"], ["calib_size"]), (["--iters", "0"], ["iters"]),
                (["--recon-batch-size", "0"], ["recon_batch_size"]), (["--mixed", "avg_bits=3"], ["bad budget"]),
                (["--mixed", "avg-bits=3,4"], ["one budget"]),
                (["--mixed", "avg-bits=3", "--objective", "curv"], ["one objective", "hawq"]),
                (["--mixed", "avg-bits=3", "--abits", "9"], ["2..8"]),
                (["--mixed", "avg-bits=3", "--sensitivity", "/nonexistent/s.json"], ["does not exist"]),
                (["--mixed", "avg-bits=3", "--weight-mode", "asymmetric"], ["symmetric"]),
                (["--tie-shortcuts"], ["--mixed"]), (["--opset", "30"], ["13..25"]), (["--opset", "x"], ["--opset"]),
                (["--device", "tpu"], ["unknown device"]), (["--seed", "x"], ["--seed"]),
                (["--data", "npz:/nonexistent/d.npz"], ["not found"]), (["--data-root", "/nonexistent",
                 "--data", "cifar10"], ["cifar10"])]


@pytest.mark.parametrize("args, needles", EXPORT_CASES, ids=[" ".join(a) for a, _ in EXPORT_CASES])
def test_every_bad_export_input_is_one_line_and_writes_nothing(tmp_path, capsys, finished, args, needles):
    pytest.importorskip("onnx")
    run = _copy_run(finished, tmp_path / "run")
    bits = [] if {"--bits", "--mixed"} & set(args) else ["--bits", "W4A4"]
    bad, err = _one_line_refusal(capsys, ["export", str(run), "--quiet", "--out", str(tmp_path / "m.onnx"), *bits,
                                          *args], needles, tmp_path)
    assert not bad, (bad, err)


def test_export_out_paths_are_refused_before_any_work(tmp_path, capsys, finished):
    pytest.importorskip("onnx")
    run = _copy_run(finished, tmp_path / "run")
    for out, needles in ((tmp_path, ["is a folder"]), (tmp_path / "no" / "m.onnx", ["does not exist"])):
        bad, err = _one_line_refusal(capsys, ["export", str(run), "--bits", "W4A4", "--out", str(out)], needles,
                                     tmp_path)
        assert not bad, (bad, err)
    bad, err = _one_line_refusal(capsys, ["export", str(tmp_path / "nothing"), "--bits", "W4A4", "--out",
                                          str(tmp_path / "m.onnx")], ["nothing does not exist"], tmp_path)
    assert not bad, (bad, err)


@pytest.mark.parametrize("args, needles", PTQ_CASES, ids=[" ".join(a) for a, _ in PTQ_CASES])
def test_every_bad_ptq_input_is_one_line_and_writes_nothing(tmp_path, capsys, finished, args, needles):
    run = _copy_run(finished, tmp_path / "run")
    bad, err = _one_line_refusal(capsys, ["ptq", str(run), "--quiet", *args], needles, tmp_path)
    assert not bad, (bad, err)


def test_ptq_on_missing_or_damaged_models(tmp_path, capsys, finished):
    bad, err = _one_line_refusal(capsys, ["ptq", str(tmp_path / "nothing"), "--quiet"], ["nothing does not exist"],
                                 tmp_path)
    assert not bad, (bad, err)
    (tmp_path / "empty").mkdir()
    bad, err = _one_line_refusal(capsys, ["ptq", str(tmp_path / "empty"), "--quiet"],
                                 ["holds no model.pt", "not a finished"], tmp_path)
    assert not bad, (bad, err)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(finished / "checkpoint.pt", unfinished / "checkpoint.pt")
    bad, err = _one_line_refusal(capsys, ["ptq", str(unfinished), "--quiet"], ["did not finish", "--resume"],
                                 tmp_path)
    assert not bad, (bad, err)
    run = _copy_run(finished, tmp_path / "run")
    (run / "model.pt").write_bytes(_evil_pickle())
    bad, err = _one_line_refusal(capsys, ["ptq", str(run), "--quiet"], ["model.pt", "unsafe"], tmp_path)
    assert not bad, (bad, err)
    assert "weights_only=False" not in err
    (run / "model.pt").write_bytes(_tensor_file({"w": torch.zeros(2)}))
    bad, err = _one_line_refusal(capsys, ["ptq", str(run), "--quiet"], ["not a model written by dnq train"], tmp_path)
    assert not bad, (bad, err)


def test_overwrite_refuses_foreign_folders_the_cwd_and_home(tmp_path, monkeypatch, capsys, finished):
    # a folder with a config.json that dnq did not write, and other files: untouched
    p = tmp_path / "P"
    (p / "src").mkdir(parents=True)
    (p / "config.json").write_text("{}")
    (p / "notes.txt").write_text("k")
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "1", "--out", str(p), "--overwrite"],
                                 ["not written by dnq train"], tmp_path)
    assert not bad, (bad, err)
    # a real run folder holding a file of the user's: untouched
    run = _copy_run(finished, tmp_path / "run")
    (run / "my-notes.txt").write_text("mine")
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "1", "--out", str(run), "--overwrite"],
                                 ["my-notes.txt"], tmp_path)
    assert not bad, (bad, err)
    # the current folder, even when it is a run folder
    (run / "my-notes.txt").unlink()
    monkeypatch.chdir(run)
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "1", "--out", ".", "--overwrite"],
                                 ["current folder"], tmp_path)
    assert not bad, (bad, err)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(run))
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "1", "--out", str(run), "--overwrite"],
                                 ["$HOME"], tmp_path)
    assert not bad, (bad, err)


def test_out_under_a_regular_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    bad, err = _one_line_refusal(capsys, ["train", *FAST, "--epochs", "1", "--out", str(tmp_path / "file" / "run")],
                                 ["is a file"], tmp_path)
    assert not bad, (bad, err)


def test_overwrite_replaces_a_run_and_a_failed_replacement_keeps_the_old_one(tmp_path, capsys, finished):
    run = _copy_run(finished, tmp_path / "run")
    old = {p.name: p.read_bytes() for p in run.iterdir()}
    # fails in the first epoch (NaN): the old run is put back, byte for byte
    assert main(["train", *FAST, "--epochs", "1", "--out", str(run), "--overwrite", "--lr", "1e30"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == old
    # succeeds: the new run replaces the old one, nothing else is left
    assert main(["train", *FAST, "--epochs", "2", "--out", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt",
                                                     "result.json"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert (os.stat(run / "model.pt").st_mode & 0o777) == 0o666 & ~_umask()  # the umask's mode, not 0600


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out), "--lr", "1e30"]) == 2
    capsys.readouterr()
    assert not out.exists()


def test_resume_after_a_nan_stop_with_a_lower_lr_is_allowed_and_recorded(tmp_path, capsys, finished):
    run = _copy_run(finished, tmp_path / "run")
    (run / "model.pt").unlink()
    assert main(["train", *FAST, "--epochs", "3", "--lr", "0.05", "--lambda-max", "0.5", "--out", str(run),
                 "--resume"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == 0.05 and cfg["epochs"] == 3
    assert cfg["resumed"] == [{"at_epoch": 1, "changed": {"lr": {"from": 0.1, "to": 0.05},
                                                          "lambda_max": {"from": 1.0, "to": 0.5},
                                                          "epochs": {"from": 1, "to": 3}}}]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if not r.get("final")] == [0, 1, 2]
    # the cosine schedule was rebuilt for 3 epochs at the new lr: at the end of epoch 2 of 3, lr = 0.05 * cos^2(pi/3)
    assert lines[1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 2 / 3)), rel=1e-6)
    # other settings still may not change
    assert main(["train", *FAST, "--epochs", "4", "--momentum", "0.5", "--out", str(run), "--resume"]) == 2
    assert "momentum" in capsys.readouterr().err


# -- real processes ----------------------------------------------------------------------------------
def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dnq", "train", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early: {proc.stderr.read().decode()[-1500:]}")
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def test_a_second_writer_is_refused_even_while_the_first_is_stopped(tmp_path):
    run = tmp_path / "run"
    a = _start([*FAST, "--epochs", "8", "--batch-size", "16", "--out", run], tmp_path)
    try:
        _wait_for(run / "checkpoint.pt", a)
        os.kill(a.pid, signal.SIGSTOP)
        before = tree(tmp_path)
        for extra in (["--overwrite"], ["--resume"]):
            p = run_dnq("train", *FAST, "--epochs", "8", "--batch-size", "16", "--out", run, *extra, check=False)
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            assert p.returncode == 2 and len(lines) == 1, p.stderr
            assert "in use by dnq train" in p.stderr and f"pid {a.pid}" in p.stderr, p.stderr
        assert tree(tmp_path) == before
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=300) == 0, a.stderr.read().decode()[-1500:]
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
    cfg = json.loads((run / "config.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert cfg["epochs"] == result["epochs"] == 8 and not (run / ".dnq.lock").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    a = _start([*FAST, "--epochs", "8", "--batch-size", "16", "--out", run], tmp_path)
    _wait_for(run / "checkpoint.pt", a)
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    assert (run / ".dnq.lock").exists()  # left behind, but no process holds it
    p = run_dnq("train", *FAST, "--epochs", "8", "--batch-size", "16", "--out", run, "--resume", check=False)
    assert p.returncode == 0, p.stderr
    assert "taking over the lock" in p.stderr and f"pid {a.pid}" in p.stderr
    notice = [ln for ln in p.stderr.splitlines() if "taking over the lock" in ln]
    assert len(notice) == 1 and notice[0].startswith("dnq train: warning: "), p.stderr  # one line, no file:line
    assert "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr
    assert not (run / ".dnq.lock").exists()
