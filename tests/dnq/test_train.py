import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dnq import train as train_mod
from dnq.cli import main
from dnq.methods import METHODS
from dnq.models import MODELS
from dnq.train import NonFiniteLossError, TrainConfig, train
from tests.conftest import ROOT, run_dnq

FAST = ["--data", "digits", "--model", "cnn-digits", "--quiet"]


def test_a_val_size_that_is_no_number_is_refused_by_the_parser(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--val-size", "lots"]) == 2
    assert "--val-size takes auto, none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needles", [
    (["--model", "resnet9"], ["unknown model", *MODELS]),
    (["--method", "adamw"], ["unknown method", *METHODS]),
    (["--data", "mnist"], ["unknown dataset", "digits", "cifar10", "cifar100", "npz:PATH"]),
    (["--wbits", "1"], ["wbits", "2..8"]),
    (["--abits", "9"], ["abits", "2..8"]),
    (["--epochs", "-3"], ["epochs", ">= 1"]),
    (["--epochs", "0"], ["epochs", ">= 1", "untrained"]),
    (["--swa-start", "1.5"], ["swa_start"]),
    (["--val-size", "-3"], ["val_size", "fraction"]),
    (["--val-size", "1.5"], ["val_size", "fraction"]),
    (["--val-size", "99999"], ["val_size 99999", "0..1436"]),
    (["--method", "gaussian-walk", "--first-last-bits", "9"], ["first_last_bits", "2..8"]),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, args, needles):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not out.exists()  # nothing written


def test_existing_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "model.pt").stat().st_mtime_ns == stamp
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    assert main(["train", *FAST, "--epochs", "1", "--out", str(other), "--overwrite"]) == 2
    assert "does not look like a run" in capsys.readouterr().err and (other / "notes.txt").read_text() == "precious"


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(method="dnq", epochs=3, out=str(out), swa_start=0.5), quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "dnq" and cfg["wbits"] == 4 and cfg["environment"]["torch"] == torch.__version__
    assert "git_commit" in cfg["environment"] and cfg["world_size"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 2]
    assert [r.get("final", False) for r in lines] == [False] * 3 + [True]
    # per-epoch numbers on the validation split; test only in the final line
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lambda", "lr"} <= set(lines[0])
    assert not any(k.startswith("test") for r in lines[:3] for k in r)
    assert lines[-1]["test_acc"] == result["test_acc"] and lines[-1]["val_acc"] == result["val_acc"]
    assert result["bn"] == "recomputed" and cfg["splits"] == {"train": 1150, "val": 287, "test": 360, "val_seed": 0}
    assert set(lines[0]["noise"]) == {"weight", "act"} and lines[0]["noise"]["weight"]["0"]["sigma"] > 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["swa"] is not None and "rng" in ckpt
    blob = torch.load(out / "model.pt", weights_only=True)
    assert blob["meta"]["arch"] == "cnn-digits" and blob["result"]["test_acc"] == result["test_acc"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # atomic writes leave no temp file


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_train_and_ptq_each_method_on_digits(tmp_path, method):
    out = tmp_path / method
    run_dnq("train", *FAST, "--method", method, "--epochs", "15", "--out", out)
    ranges = "minmax,percentile,mse" if method == "dnq" else "minmax"
    p = run_dnq("ptq", out, "--bits", "W8A8,W4A4,W2A4", "--range", ranges, "--quiet")
    assert "W8A8" in p.stdout
    report = json.loads((out / "ptq.json").read_text())
    fp = report["fp"]["test_acc"]
    # the accumulating ablation is meant to hurt: the noise random-walks the weights (measured ~0.56)
    assert fp > (0.3 if method == "gaussian-walk" else 0.85), f"{method}: FP accuracy {fp}"
    rows = {(r["bits"], r["range"]): r for r in report["results"]}
    assert len(rows) == 3 * len(ranges.split(","))
    for r in ranges.split(","):
        assert abs(rows[("W8A8", r)]["test_acc"] - fp) <= 0.01, (method, r, rows[("W8A8", r)], fp)
        assert rows[("W2A4", r)]["test_loss"] > rows[("W8A8", r)]["test_loss"]


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    args = [*FAST, "--method", "dnq", "--epochs", "12", "--batch-size", "16", "--swa-start", "0.5", "--seed", "3"]
    ref = tmp_path / "ref"
    run_dnq("train", *args, "--out", ref)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dnq", "train", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 4 <= done < 12 and not (out / "model.pt").exists(), "the kill must land mid-run"
    p = run_dnq("train", *args, "--out", out, "--resume", check=False)
    assert p.returncode == 0, p.stderr
    a = torch.load(ref / "model.pt", weights_only=True)["model"]
    b = torch.load(out / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb] and len(ra) == 13 and ra[-1]["final"]
    assert ra[-1]["test_loss"] == rb[-1]["test_loss"]


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", *FAST, "--epochs", "2", "--momentum", "0.5", "--label-smoothing", "0", "--out", str(out),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "momentum" in err and "label_smoothing" in err and "may change on --resume" in err
    assert main(["train", *FAST, "--epochs", "1", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.make_criterion

    def poisoned(cfg):
        crit = real(cfg)

        def f(out, y):
            calls["n"] += 1
            loss = crit(out, y)
            return loss * float("nan") if calls["n"] == 8 + 3 else loss  # epoch 2 (8 steps/epoch), step 3
        return f

    monkeypatch.setattr(train_mod, "make_criterion", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3") as e:
        train(TrainConfig(method="sgd", epochs=4, out=str(out)), quiet=True)
    assert "checkpoint" in str(e.value)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_ptq_cli_errors(tmp_path, capsys):
    assert main(["ptq", str(tmp_path)]) == 2
    assert "model.pt" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["ptq", str(out), "--bits", "W1A8"]) == 2
    assert "2..8" in capsys.readouterr().err
    assert main(["ptq", str(out), "--range", "kl"]) == 2
    assert "minmax" in capsys.readouterr().err


def test_amp_and_channels_last_forced_on_the_cpu(tmp_path, capsys):
    """``--amp --channels-last`` run the CUDA settings on the CPU; resuming with others is refused."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--method", "dnq", "--epochs", "2", "--amp", "--channels-last",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["amp"] is True and cfg["channels_last"] is True and cfg["resolved_device"] == "cpu"
    res = json.loads((out / "result.json").read_text())
    assert res["test_acc"] > 0.5  # 2 epochs of digits in bf16 still learn
    assert main(["train", *FAST, "--method", "dnq", "--epochs", "3", "--no-amp", "--channels-last", "--out", str(out),
                 "--resume"]) == 2
    assert "amp=True/False" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(plain)]) == 0
    cfg = json.loads((plain / "config.json").read_text())
    assert cfg["amp"] is False and cfg["channels_last"] is False  # the CPU default: off


def test_torchrun_with_a_fixed_gpu_index_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train_mod.ConfigError, match="LOCAL_RANK"):
        train_mod.validate(TrainConfig(device="cuda:1"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(train_mod.ConfigError, match="CUDA is not available") if not torch.cuda.is_available() \
            else contextlib.nullcontext():
        train_mod.validate(TrainConfig(device="cuda:0"))


def test_old_checkpoint_configs_resume_with_their_effective_settings():
    old = {"amp": True, "device": "auto", "bn_recompute": True}  # saved before channels_last: amp meant "bf16 on CUDA"
    assert train_mod._upgrade_saved_config(old, cuda=False) == {**old, "amp": False, "channels_last": False}
    assert train_mod._upgrade_saved_config(old, cuda=True) == {**old, "amp": True, "channels_last": True}
    # saved before the fair-comparison rules: no validation split, BatchNorm as trained, first/last
    # noise at the target bits, and "gaussian" was the accumulating walk
    older = {"amp": True, "channels_last": False, "method": "gaussian"}
    assert train_mod._upgrade_saved_config(older, cuda=False) == {
        **older, "bn_recompute": False, "val_size": 0, "val_seed": 0, "first_last_bits": None,
        "method": "gaussian-walk"}


@pytest.mark.slow
def test_compiled_training_with_inductor(tmp_path):
    """``--compile`` end to end with inductor on the CPU: one graph for the model and its noise
    hooks, no graph break, and no recompile after the first epoch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "run"
    res = train(TrainConfig(method="dnq", epochs=3, out=str(out), compile=True, amp=True, channels_last=True,
                            lambda_warmup=3), quiet=True)  # lambda changes every epoch
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {} and not counters["recompiles"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][:-1]
    assert [m["lambda"] for m in metrics] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert res["test_acc"] > 0.6 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
