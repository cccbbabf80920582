"""Atomic writes: readers see the old file or the new one, never half, and no temp file is left."""

import json

import pytest
import torch

from dnq_landscape_common.io import _atomic, atomic_write_json, atomic_write_text, safe_load


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def half(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic(path, half)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_json_of_tensors_and_paths_and_the_safe_loader_refuses_objects(tmp_path):
    atomic_write_json(tmp_path / "sub" / "r.json", {"x": torch.tensor([1, 2]), "p": tmp_path})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": [1, 2], "p": str(tmp_path)}
    torch.save({"obj": object()}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        safe_load(tmp_path / "bad.pt")
