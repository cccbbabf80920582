"""Optional: the real CIFAR-10 subset from ../shared (skipped, with the reason shown, where it is absent)."""

import json

import pytest

from tests.conftest import CIFAR_NPZ, run_dnq

pytestmark = pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason=f"{CIFAR_NPZ} not present")


@pytest.mark.slow
def test_train_and_ptq_on_real_32x32_data(tmp_path):
    out = tmp_path / "run"
    run_dnq("train", "--data", f"npz:{CIFAR_NPZ}", "--model", "cnn-digits", "--method", "dnq", "--epochs", "2",
            "--batch-size", "256", "--quiet", "--out", out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_acc"] > 0.2  # above chance (0.1) after two epochs of augmented training
    run_dnq("ptq", out, "--bits", "W8A8", "--range", "minmax", "--quiet", cwd=tmp_path)  # npz path stored absolute
    report = json.loads((out / "ptq.json").read_text())
    assert abs(report["results"][0]["test_acc"] - report["fp"]["test_acc"]) <= 0.02
