"""The one ``--device`` parser: names, availability, indices, torchrun."""

import pytest
import torch

from dnq_landscape_common import device as dev
from dnq_landscape_common.device import DeviceError, check_device, device_kind, parse_device, resolve_device


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "CPU", "cuda:", "", None, 0, "cuda:0:1"])
def test_unknown_names_are_refused_with_the_valid_ones(bad):
    with pytest.raises(DeviceError, match=r"unknown device .*; valid: auto, cpu, cuda, cuda:N"):
        check_device(bad)


def test_an_entry_point_keeps_its_own_error_class():
    class StudyError(ValueError):
        pass

    with pytest.raises(StudyError, match="unknown device 'gpu'"):
        check_device("gpu", StudyError)
    assert check_device("cpu", StudyError) == "cpu"


def test_cuda_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="CUDA is not available here; use --device cpu or auto"):
            check_device(name)
    assert device_kind("auto") == "cpu" and parse_device("auto") == torch.device("cpu")


def test_gpu_indices_and_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match=r"this machine has 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        check_device("cuda:2")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun: the rank's GPU
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DeviceError, match="under torchrun: every process takes the GPU of its LOCAL_RANK"):
        check_device("cuda:0")
    assert check_device("cuda") == "cuda"
    assert dev.DEVICES == "auto, cpu, cuda, cuda:N"
