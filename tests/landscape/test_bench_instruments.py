"""The instruments benchmark's runner (benchmarks/bench_instruments.py): a tool that crashes
becomes a row ``"crash: Type: first line"`` and the run goes on, every row written out as it comes."""

from __future__ import annotations

import importlib.util
import json

import torch
import torch.nn as nn

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_instruments", ROOT / "benchmarks" / "bench_instruments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_crashing_peer_is_a_row_and_the_next_one_runs(tmp_path):
    bench = _bench()
    table = bench.Table(tmp_path / "rows.json")

    def crashing():
        raise ValueError("boom\nthe rest of the message")

    def working():
        table.append({"workload": "w", "task": "t", "tool": "working", "grad_eq": 1.0})
        return 7

    assert bench.attempt(table, "w", "t", "crashing", crashing) is None
    assert bench.attempt(table, "w", "t", "working", working) == 7
    assert table.rows[0] == {"workload": "w", "task": "t", "tool": "crashing", "note": "crash: ValueError: boom"}
    assert table.rows[1]["tool"] == "working"
    assert json.loads((tmp_path / "rows.json").read_text()) == table.rows  # written as they come
    bench.print_ratios(table.rows)  # a crash row has no time: left out of the ratios


def test_a_task_goes_on_past_a_peer_that_crashes(capsys):
    """The real task code on a tiny model, with a PyHessian that raises (as PyHessian 0.1 does in
    its density, and loss-landscapes on CUDA): its row says why, ours and the others are measured."""
    bench = _bench()

    class Tiny(bench.Workload):
        def __init__(self):  # no gradient timing, no reference: the unit is 1 s
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
            g = torch.Generator().manual_seed(1)
            self.batches = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]
            self.name, self.rows, self.g, self.ref, self.cuda = "tiny", bench.Table(), 1.0, None, False
            self.params = list(self.model.parameters())

        def pyhessian(self):
            raise RuntimeError("filter_normalize_: expected all tensors to be on the same device\ndetail")

    w = Tiny()
    bench.eig_tasks(w, 1)
    rows = {r["tool"].split(" (")[0]: r for r in w.rows.rows}
    assert rows["PyHessian"]["note"] == ("crash: RuntimeError: filter_normalize_: expected all tensors to be on "
                                         "the same device")
    assert rows["ours"]["grad_eq"] > 0 and rows["ours"]["engines"].startswith("product:")
    if bench.has_curvlinops():
        assert rows["curvlinops"]["grad_eq"] > 0
