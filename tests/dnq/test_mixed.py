"""Curvature-guided mixed precision: landscape.layer_sensitivity against a dense float64 Hessian,
dnq.mixed.allocate against brute force, the sensitivity file, dnq ptq --mixed, and the study and
report with a `mixed` section."""

import csv
import itertools
import json
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, hessian

from dnq.mixed import InfeasibleBudgetError, allocate, count_macs, parse_budget, parse_budgets, shared_input_groups
from landscape import HessianOperator
from landscape.sensitivity import error_moments, layer_sensitivity
from tests.conftest import run_dnq


# -- the integer program against an independent brute force -----------------------------------------
def _enumerate(costs, sizes, cap_of, fixed=(), tied=()):
    """Every allocation (tied layers together) whose exact resource fits; the best objective."""
    layers = [n for n in costs if n not in fixed]
    groups = [list(g) for g in tied] + [[n] for n in layers if not any(n in g for g in tied)]
    cand = sorted(costs[layers[0]])
    best = None
    for choice in itertools.product(cand, repeat=len(groups)):
        bits = {n: b for g, b in zip(groups, choice) for n in g}
        if not cap_of(bits):
            continue
        obj = sum(costs[n][b] for n, b in bits.items())
        best = obj if best is None or obj < best else best
    return best


def _table(rng, n=6, bits=(2, 3, 4, 8)):
    layers = [f"l{i}" for i in range(n)]
    costs = {name: {b: float(rng.exponential() * 4.0 ** (-b) * rng.uniform(0.1, 10)) for b in bits}
             for name in layers}
    sizes = {name: int(rng.integers(16, 5000)) for name in layers}
    return layers, costs, sizes


@pytest.mark.parametrize("seed", range(8))
def test_allocate_matches_brute_force_and_respects_the_budget_exactly(seed):
    rng = np.random.default_rng(seed)
    layers, costs, sizes = _table(rng)
    total = sum(sizes.values())
    for budget in (2.0, 2.25, 2.5, 3.0, 3.3, 4.0, 6.0, 8.0):
        a = allocate(costs, sizes, budget)
        used = sum(Fraction(sizes[n] * a.bits[n]) for n in layers)
        assert used <= Fraction(budget) * total  # exact, not up to a tolerance
        best = _enumerate(costs, sizes, lambda bits, budget=budget: sum(sizes[n] * b for n, b in bits.items())
                          <= Fraction(budget) * total)
        assert a.objective == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert a.objective == pytest.approx(sum(costs[n][a.bits[n]] for n in layers), rel=1e-12)
        assert a.avg_bits == pytest.approx(float(used) / total)


def test_bytes_and_bops_budgets_count_fixed_layers_and_match_brute_force():
    rng = np.random.default_rng(11)
    layers, costs, sizes = _table(rng, n=6)
    fixed = {"first": 8, "last": 8}
    sizes.update({"first": 300, "last": 500})
    macs = {n: int(rng.integers(1000, 10 ** 6)) for n in [*layers, *fixed]}
    abits = {n: (8 if n in fixed else 4) for n in macs}
    fixed_bytes = Fraction(300 * 8 + 500 * 8, 8)
    fixed_bops = sum(Fraction(macs[n] * 8 * 8) for n in fixed)
    for frac in (0.3, 0.5, 0.8):
        lo = fixed_bytes + sum(Fraction(sizes[n] * 2, 8) for n in layers)
        hi = fixed_bytes + sum(Fraction(sizes[n] * 8, 8) for n in layers)
        budget = float(lo + (hi - lo) * Fraction(frac))
        a = allocate(costs, sizes, budget, fixed, kind="bytes")
        assert Fraction(a.bytes) <= Fraction(budget)
        assert a.bytes == float(fixed_bytes + sum(Fraction(sizes[n] * a.bits[n], 8) for n in layers))
        best = _enumerate(costs, sizes, lambda bits, budget=budget: (
            fixed_bytes + sum(Fraction(sizes[n] * b, 8) for n, b in bits.items()) <= Fraction(budget)))
        assert a.objective == pytest.approx(best, rel=1e-12)
        lo_b = fixed_bops + sum(Fraction(macs[n] * 2 * 4) for n in layers)
        hi_b = fixed_bops + sum(Fraction(macs[n] * 8 * 4) for n in layers)
        budget_b = float(lo_b + (hi_b - lo_b) * Fraction(frac))
        b = allocate(costs, sizes, budget_b, fixed, kind="bops", macs=macs, abits=abits)
        used = fixed_bops + sum(Fraction(macs[n] * b.bits[n] * 4) for n in layers)
        assert used <= Fraction(budget_b) and b.bops == pytest.approx(float(used))
        best = _enumerate(costs, sizes, lambda bits, budget_b=budget_b: (
            fixed_bops + sum(Fraction(macs[n] * v * 4) for n, v in bits.items()) <= Fraction(budget_b)))
        assert b.objective == pytest.approx(best, rel=1e-12)
        assert set(b.bits) == set(layers) and b.fixed == fixed


def test_fixed_and_tied_layers_are_honoured():
    rng = np.random.default_rng(3)
    layers, costs, sizes = _table(rng)
    tied = [["l1", "l4"], ["l2", "l3", "l5"]]
    for budget in (2.5, 3.0, 4.5):
        a = allocate(costs, sizes, budget, fixed={"l0": 8}, tied=tied)
        assert "l0" not in a.bits and a.fixed == {"l0": 8}
        assert a.bits["l1"] == a.bits["l4"] and a.bits["l2"] == a.bits["l3"] == a.bits["l5"]
        free = [n for n in layers if n != "l0"]
        total = sum(sizes[n] for n in free)
        sub = {n: costs[n] for n in free}
        best = _enumerate(sub, sizes, lambda bits, budget=budget, total=total: (
            sum(sizes[n] * b for n, b in bits.items()) <= Fraction(budget) * total), tied=tied)
        assert a.objective == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match="fixed"):
        allocate(costs, sizes, 3.0, fixed={"l1": 8}, tied=[["l1", "l2"]])


def test_infeasible_and_boundary_budgets():
    rng = np.random.default_rng(5)
    layers, costs, sizes = _table(rng)
    with pytest.raises(InfeasibleBudgetError) as e:
        allocate(costs, sizes, 1.9)
    assert "smallest feasible budget is 2" in str(e.value) and "from 8" in str(e.value)
    lo = allocate(costs, sizes, 2.0)  # exactly the smallest: every layer at its lowest bits
    assert set(lo.bits.values()) == {2}
    hi = allocate(costs, sizes, 8.0)  # costs fall with bits: everything at 8
    assert set(hi.bits.values()) == {8}
    total_min = 300 * 8 / 8 + sum(sizes[n] * 2 / 8 for n in layers)
    with pytest.raises(InfeasibleBudgetError, match=f"{total_min:.6g}"):
        allocate(costs, {**sizes, "f": 300}, total_min - 1, {"f": 8}, kind="bytes")
    with pytest.raises(ValueError, match="same candidates"):
        allocate({"a": {2: 1.0, 4: 0.5}, "b": {2: 1.0}}, {"a": 1, "b": 1}, 3.0)
    with pytest.raises(ValueError, match="macs"):
        allocate(costs, sizes, 1e6, kind="bops")
    assert parse_budget("avg-bits=2.5") == ("avg-bits", 2.5)
    assert parse_budgets("avg-bits=2.5,3") == [("avg-bits", 2.5), ("avg-bits", 3.0)]
    for bad in ("avg_bits=3", "avg-bits=-1", "size=3", "avg-bits=x"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_count_macs_and_shared_inputs_on_resnet20():
    from dnq.models import build_model

    model = build_model("resnet20", 10, 3, 32).eval()
    macs = count_macs(model, torch.randn(3, 3, 32, 32))
    # by hand: conv1 3->16, 3x3, 32x32 output; the fc 64->10
    assert macs["conv1"] == 32 * 32 * 16 * 3 * 9 and macs["fc"] == 640
    assert macs["layers.3.shortcut.0"] == 16 * 16 * 32 * 16  # 1x1 stride 2: 16x16 output
    assert 40e6 < sum(macs.values()) < 42e6  # resnet20's published 41M MACs
    assert shared_input_groups(model, torch.randn(2, 3, 32, 32)) == [
        ["layers.3.conv1", "layers.3.shortcut.0"], ["layers.6.conv1", "layers.6.shortcut.0"]]


# -- the sensitivities against a dense float64 Hessian -----------------------------------------------
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    x, y = torch.randn(24, 1, 6, 6, dtype=torch.float64), torch.randint(0, 5, (24,))
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(*flat):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, flat)), (x,)), y)

    H = hessian(loss, argnums=tuple(range(len(names))))(*params.values())
    ps = [p.clone().requires_grad_(True) for p in params.values()]
    g = dict(zip(names, torch.autograd.grad(loss(*ps), ps)))
    blocks = {n: H[i][i].reshape(params[n].numel(), params[n].numel()) for i, n in enumerate(names)}
    errors = {}
    gen = torch.Generator().manual_seed(1)
    for n in ("0.weight", "3.weight"):
        errors[n] = {}
        for b in (2, 4):
            e = torch.randn(params[n].shape, generator=gen, dtype=torch.float64) * 0.2 / b + 0.02
            errors[n][b] = error_moments(e)
    errors["3.bias"] = {2: error_moments(torch.randn(5, generator=gen, dtype=torch.float64) * 0.1, per="element")}
    op = HessianOperator(model, nn.functional.cross_entropy, (x, y))
    return model, params, g, blocks, errors, op


def _expand(v, shape):
    return v.reshape(v.shape + (1,) * (len(shape) - v.dim())).expand(shape).reshape(-1)


def _truth(params, g, blocks, errors):
    pred, hawq, terms = {}, {}, {}
    for n, per in errors.items():
        H = blocks[n]
        for b, (m, v) in per.items():
            M, V = _expand(m, params[n].shape), _expand(v, params[n].shape)
            t = (g[n].reshape(-1) @ M, 0.5 * M @ H @ M, 0.5 * (torch.diagonal(H) * V).sum())
            pred[n, b] = float(sum(t))
            terms[n, b] = [float(x) for x in t]
            hawq[n, b] = float(torch.trace(H) / M.numel() * (M * M + V).sum())
    return pred, hawq, terms


def test_predicted_and_hawq_equal_the_dense_hessian_with_exact_traces(small):
    model, params, g, blocks, errors, op = small
    res = layer_sensitivity(op, errors, method="exact", block_size=7)
    pred, hawq, terms = _truth(params, g, blocks, errors)
    for (n, b), v in pred.items():
        assert res.predicted[n][b] == pytest.approx(v, abs=1e-6 * max(1.0, abs(v)), rel=1e-9)
        assert [res.gradient_term[n][b], res.mean_curvature_term[n][b], res.trace_term[n][b]] == pytest.approx(
            terms[n, b], rel=1e-9, abs=1e-12)
        assert res.hawq[n][b] == pytest.approx(hawq[n, b], rel=1e-9, abs=1e-12)
        assert res.predicted_std_error[n][b] == 0.0
    for n in errors:
        assert res.layer_trace[n] == pytest.approx(float(torch.trace(blocks[n])), rel=1e-10)
    assert res.num_matvecs == sum(params[n].numel() for n in errors) and res.num_gradients == 1
    assert res.bits == [2, 4] and res.layers == list(errors)


def test_hutchinson_sensitivities_are_unbiased_reproducible_and_share_products(small):
    model, params, g, blocks, errors, op = small
    pred, hawq, _ = _truth(params, g, blocks, errors)
    before = op.num_matvecs
    a = layer_sensitivity(op, errors, num_matvecs=600, seed=3)
    spent = op.num_matvecs - before
    # one set of probes serves every layer and bit-width: 600 products plus one form per (layer, bits) mean
    assert a.num_matvecs == 600 and spent == 600 + a.num_quadratic_forms
    assert a.num_quadratic_forms == sum(len(p) for p in errors.values())
    for (n, b), v in pred.items():
        se = a.predicted_std_error[n][b]
        if not errors[n][b][1].any():  # no variance: no trace term, the prediction is exact
            assert se == 0 and a.predicted[n][b] == pytest.approx(v, rel=1e-9)
            continue
        assert se > 0 and abs(a.predicted[n][b] - v) < 5 * se
        assert abs(a.hawq[n][b] - hawq[n, b]) < 5 * a.hawq_std_error[n][b] + 1e-12
    same = layer_sensitivity(op, errors, num_matvecs=600, seed=3)
    other = layer_sensitivity(op, errors, num_matvecs=600, seed=4)
    assert same.predicted == a.predicted and other.predicted != a.predicted


def test_layer_sensitivity_refuses_bad_errors(small):
    model, params, g, blocks, errors, op = small
    with pytest.raises(ValueError, match="does not have"):
        layer_sensitivity(op, {"9.weight": errors["0.weight"]})
    with pytest.raises(ValueError, match="per-channel prefix"):
        layer_sensitivity(op, {"0.weight": {2: (torch.zeros(4), torch.zeros(4))}})
    with pytest.raises(ValueError, match=">= 0"):
        layer_sensitivity(op, {"0.weight": {2: (torch.zeros(3), -torch.ones(3))}})
    with pytest.raises(ValueError, match="integers"):
        layer_sensitivity(op, {"0.weight": {"2": errors["0.weight"][2]}})
    with pytest.raises(ValueError, match="num_matvecs"):
        layer_sensitivity(op, errors, num_matvecs=1)


def test_error_moments_give_the_squared_error():
    e = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    m, v = error_moments(e)
    assert m.shape == (4,) and float((12 * (m * m + v)).sum()) == pytest.approx(float((e * e).sum()), rel=1e-12)
    m, v = error_moments(e, per="element")
    assert torch.equal(m, e) and not v.any()


# -- the study-layer sensitivity, the file, and dnq ptq --mixed ---------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "run"
    run_dnq("train", "--data", "digits", "--model", "cnn-digits", "--epochs", "4", "--method", "sgd", "--out", out,
            "--quiet", "--device", "cpu")
    return out


def test_measured_sensitivity_is_the_loss_with_one_layer_quantized(run):
    from dnq.data import load_dataset
    from dnq.quant import quantize_weight
    from dnq.train import load_model
    from landscape.sensitivity_run import measure_sensitivity, training_batches

    model, meta = load_model(run)
    ds = load_dataset("digits", val_size=meta["val_size"], val_seed=meta["val_seed"])
    data = training_batches(ds, 200, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = measure_sensitivity(model, data, [2, 4], num_matvecs=4, seed=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    layer = dict(model.named_modules())["3"]
    w = layer.weight.detach().clone()
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(x), y))
        layer.weight.copy_(quantize_weight(w, 2))
        q = float(nn.functional.cross_entropy(model(x), y))
        layer.weight.copy_(w)
    assert out["measured"]["3"][2] == pytest.approx(q - base, rel=1e-4, abs=1e-6)
    assert [d["name"] for d in out["layers"]] == ["0", "3", "7", "12"]
    assert out["cost"]["matvecs"] == 4 and out["cost"]["forward_passes"] == 1 + 2 * 4 * 2
    assert out["cost"]["curvature_gradient_equivalents"] > 1


def test_sensitivity_cli_writes_a_keyed_file_and_refuses_another_models(run, tmp_path):
    from landscape.cli import main

    assert main(["sensitivity", str(run), "--bits", "2,4", "--samples", "128", "--matvecs", "4", "--quiet"]) == 0
    doc = json.loads((run / "sensitivity.json").read_text())
    assert len(doc["entries"]) == 1 and len(doc["model_hash"]) == 16
    entry = next(iter(doc["entries"].values()))
    assert entry["settings"]["bits"] == [2, 4] and entry["settings"]["samples"] == 128
    assert set(entry["measured"]["3"]) == {"2", "4"}
    # a file from another model: refused, and left as it was
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**doc, "model_hash": "0123456789abcdef"}))
    before = foreign.read_text()
    assert main(["sensitivity", str(run), "--bits", "2,4", "--out", str(foreign), "--quiet"]) == 2
    assert foreign.read_text() == before
    p = run_dnq("ptq", run, "--mixed", "avg-bits=3", "--sensitivity", foreign, "--method", "rtn", "--range", "minmax",
                "--quiet", check=False)
    assert p.returncode == 2 and "another model" in p.stderr


def test_dnq_ptq_mixed_records_allocations_within_budget(run):
    p = run_dnq("ptq", run, "--mixed", "avg-bits=2.5,3", "--objective", "predicted,hawq,measured", "--method",
                "rtn+bn", "--range", "minmax", "--quiet")
    assert "avg-bits=2.5:measured" in p.stdout
    report = json.loads((run / "ptq.json").read_text())
    rows = report["results"]
    uniform = [r for r in rows if r["mixed"] is None]
    mixed = [r for r in rows if r["mixed"] is not None]
    doc = json.loads((run / "sensitivity.json").read_text())  # this run's file (measured now if it was missing)
    used = mixed[0]["mixed"]["sensitivity"]
    assert used == str(run / "sensitivity.json")
    entry = max(doc["entries"].values(), key=lambda e: (e["settings"]["samples"], e["settings"]["matvecs"]))
    assert [r["bits"] for r in uniform] == [f"W{b}A4" for b in entry["settings"]["bits"]]  # its candidates
    assert len(mixed) == 6
    sizes = {"3": 4608, "7": 9216}  # the allocated layers of cnn-digits (first and last fixed)
    for r in mixed:
        a = r["mixed"]
        assert set(a["bits"]) == set(sizes) and a["fixed"] == {"0": 8, "12": 8}
        avg = sum(sizes[n] * b for n, b in a["bits"].items()) / sum(sizes.values())
        assert avg <= a["budget"] and r["wbits"] == pytest.approx(avg)
        assert 0 <= r["test_acc"] <= 1
    assert report["settings"]["mixed"]["objectives"] == ["predicted", "hawq", "measured"]
    p = run_dnq("ptq", run, "--mixed", "avg-bits=1.5", "--method", "rtn", "--range", "minmax", "--quiet", check=False)
    assert p.returncode == 2 and "smallest feasible budget is 2" in p.stderr


def test_quantize_follows_the_bits_per_layer(tiny_cnn):
    from dnq.quant import quantize

    calib = torch.randn(64, 1, 8, 8)
    q = quantize(tiny_cnn, 4, 4, calib, bits_by_layer={"3": 2, "7": (3, 6)})
    info = {d["layer"]: (d["wbits"], d["abits"]) for d in q.ptq_layers}
    assert info == {"0": (8, 8), "3": (2, 4), "7": (3, 6), "12": (8, 8)}
    mods = dict(q.named_modules())
    for name, (wb, _) in info.items():
        w = mods[name].weight.reshape(mods[name].weight.shape[0], -1)
        levels = max(len(torch.unique(row)) for row in w)
        assert levels <= 2 ** wb - 1  # the symmetric grid has 2^b - 1 levels
    assert max(len(torch.unique(r)) for r in mods["3"].weight.reshape(32, -1)) <= 3
    with pytest.raises(ValueError, match="not a quantized layer"):
        quantize(tiny_cnn, 4, 4, calib, bits_by_layer={"nope": 2})


# -- study and report ------------------------------------------------------------------------------
MIXED_STUDY = {
    "name": "mixed", "data": "digits", "model": "cnn-digits",
    "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": 1.0}], "seeds": [0, 1], "bits": ["W4A4", "W2A4"],
    "train": {"epochs": 2, "batch_size": 128, "device": "cpu"},
    "instruments": {"hessian_samples": 128, "hessian_batch": 64, "trace_matvecs": 6, "eig_k": 1, "density_runs": 1,
                    "density_steps": 4, "block_matvecs": 2, "noise_matvecs": 2, "surface_steps": 3, "slice_steps": 3},
    "mixed": {"budgets": [2.5, 3.0], "matvecs": 4, "bits": [2, 3, 4]},
}


def test_a_study_with_mixed_precision_and_its_report(tmp_path):
    from landscape.report import build
    from landscape.study import Study, StudyConfig, load_records

    cfg = StudyConfig.from_dict(MIXED_STUDY)
    out = tmp_path / "s"
    Study(cfg, out, device="cpu", progress=False).run()
    records = load_records(out)
    for rec in records:
        m = rec["measurements"]
        assert "sensitivity:minmax" in m and "mixed+rtn+bn:W3A4" in m  # W3A4 not in the study's bits
        assert "mixed+rtn+bn:W2A4" not in m  # the study's own ptq+bn:W2A4 serves the uniform line
        for budget in (2.5, 3.0):
            for obj in ("predicted", "hawq", "measured"):
                v = m[f"mixed+rtn+bn:avg-bits={budget:g}:{obj}"]["value"]
                assert v["allocation"]["avg_bits"] <= budget
    # a rerun does nothing; a changed budget adds only its allocations
    stamps = {r["id"]: {k: v["at"] for k, v in r["measurements"].items()} for r in records}
    cfg2 = StudyConfig.from_dict({**MIXED_STUDY, "mixed": {**MIXED_STUDY["mixed"], "budgets": [2.5, 3.5]}})
    Study(cfg2, out, device="cpu", progress=False).run()
    for rec in load_records(out):
        for k, v in rec["measurements"].items():
            if k in stamps[rec["id"]]:
                assert v["at"] == stamps[rec["id"]][k], k
        assert "mixed+rtn+bn:avg-bits=3.5:predicted" in rec["measurements"]
    Study(cfg, out, device="cpu", progress=False).run()
    html = build(out, static=True, n_boot=50).read_text()
    assert "id='mixed'" in html and "Mixed precision" in html
    assert (out / "figures" / "mixed_pareto_rtn_bn.png").is_file()
    rows = list(csv.DictReader((out / "mixed.csv").open()))
    summary = json.loads((out / "summary.json").read_text())
    table = summary["mixed"]["accuracy_at_budget"]
    records = load_records(out)
    for t in table:
        accs = [r["measurements"][f"mixed+rtn+bn:avg-bits={t['budget']:g}:hawq"]["value"]["test_acc"]
                for r in records if r["config"] == t["config"]]
        assert t["hawq"]["mean"] == pytest.approx(statistics.mean(accs))
        assert t["hawq"]["std"] == pytest.approx(statistics.stdev(accs))
        ub = math.floor(t["budget"])  # the largest uniform bit-width within the budget (2.5 -> W2, 3.0 -> W3)
        name = "ptq+bn:W2A4" if ub == 2 else f"mixed+rtn+bn:W{ub}A4"
        uni = [r["measurements"][name]["value"]["test_acc"] for r in records if r["config"] == t["config"]]
        assert t["uniform_bits"] == ub and t["uniform"]["mean"] == pytest.approx(statistics.mean(uni))
    assert len(rows) == 4 * (3 + 2 * 3)  # per model: 3 uniform points and 2 budgets x 3 objectives


def test_mixed_configs_are_validated():
    from landscape.study import StudyConfig, StudyError

    base = {k: v for k, v in MIXED_STUDY.items() if k != "mixed"}
    for mixed, match in [({"budgets": [1.5]}, "below the smallest"), ({"objectives": ["curv"]}, "objectives"),
                         ({"methods": ["gptq"]}, "methods"), ({"bits": [1, 2]}, "mixed.bits"),
                         ({"colour": 1}, "unknown keys"), ({"kind": "flops"}, "mixed.kind"), ([2.5], "mapping")]:
        with pytest.raises(StudyError, match=match):
            StudyConfig.from_dict({**base, "mixed": mixed})
    assert StudyConfig.from_dict(base).mixed is None
