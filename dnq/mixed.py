"""Mixed-precision bit allocation: one weight bit-width per layer, chosen by integer programming.

Given a sensitivity ``cost[l][b]`` of every layer ``l`` at every candidate bit-width ``b`` (the
loss increase predicted or measured with only that layer quantized, see
:mod:`landscape.sensitivity` and :mod:`landscape.sensitivity_run`), :func:`allocate` picks the
bits that minimise the summed sensitivity under a budget, as HAWQ-V3 (Yao et al., ICML 2021)
does: a binary variable ``x[l, b]`` per layer and bit-width, ``sum_b x[l, b] = 1`` per layer, and
one budget inequality, solved exactly by ``scipy.optimize.milp`` (HiGHS branch and bound).
Summing per-layer sensitivities assumes they add up (the block-diagonal approximation).

Budgets (:data:`BUDGET_KINDS`):

* ``avg-bits``: the average weight bits over the *allocated* layers, weighted by their number of
  weights: ``sum_l n_l b_l / sum_l n_l <= budget``. The fixed layers (first and last, 8 bits by
  default) are left out, so that uniform ``b``-bit quantization sits at exactly ``b``;
  :class:`Allocation` also reports ``avg_bits_all`` over every quantized layer.
* ``bytes``: the size of every quantized weight, fixed layers included: ``sum_l n_l b_l / 8``.
* ``bops``: bit operations, ``sum_l MACs_l * b_l * a_l`` with ``a_l`` the layer's activation
  bits and MACs per image counted from a traced forward pass (:func:`count_macs`), fixed layers
  included.

Layers in a ``tied`` group get the same bits (one variable): e.g. a residual block's shortcut
convolution with the block's first convolution, which read the same input
(:func:`shared_input_groups`).

Example:
    >>> from dnq.mixed import allocate
    >>> costs = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.1, 8: 0.0}}
    >>> alloc = allocate(costs, {"a": 100, "b": 300}, budget=3.0)
    >>> alloc.bits, alloc.avg_bits
    ({'a': 4, 'b': 2}, 2.5)
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn

from .errors import InfeasibleBudgetError
from .quant import check_bits, quant_layers

BUDGET_KINDS = ("avg-bits", "bytes", "bops")
OBJECTIVES = ("predicted", "hawq", "measured")


@dataclass
class Allocation:
    """The bits chosen per layer and what they cost.

    Attributes:
        bits: ``{layer: weight bits}`` of the allocated layers (tied layers included).
        fixed: ``{layer: weight bits}`` of the layers left at fixed bits.
        objective: the summed sensitivity of the choice.
        kind, budget: the budget's kind and value.
        avg_bits: average weight bits over the allocated layers (weighted by size).
        avg_bits_all: the same over every quantized layer (fixed ones included).
        bytes: size of all quantized weights (fixed layers included).
        bops: bit operations per image (``None`` without MACs).
        min_budget, max_budget: the smallest feasible budget (every allocated layer at its
            lowest bits) and the budget from which every layer can take its highest bits.
        status: the solver's message.
    """

    bits: dict
    fixed: dict
    objective: float | None
    kind: str
    budget: float
    avg_bits: float
    avg_bits_all: float
    bytes: float
    bops: float | None
    min_budget: float
    max_budget: float
    status: str = ""
    groups: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_budget(spec: str) -> tuple[str, float]:
    """``"avg-bits=3"`` -> ``("avg-bits", 3.0)``; kinds :data:`BUDGET_KINDS`."""
    m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([-+0-9.eE]+)\s*", spec or "")
    if not m or m[1] not in BUDGET_KINDS:
        raise ValueError(f"bad budget {spec!r}; write KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)} "
                         "(e.g. avg-bits=3, bytes=20000, bops=1e9)")
    try:
        value = float(m[2])
    except ValueError:
        raise ValueError(f"bad budget value in {spec!r}; write a number such as avg-bits=2.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the budget in {spec!r} must be a positive number")
    return m[1], value


def parse_budgets(spec: str) -> list[tuple[str, float]]:
    """``"avg-bits=2.5,3"`` -> ``[("avg-bits", 2.5), ("avg-bits", 3.0)]`` (one kind, several values)."""
    kind, _, values = (spec or "").partition("=")
    return [parse_budget(f"{kind}={v}") for v in values.split(",")] if values else [parse_budget(spec)]


def _int_ratio(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10 ** 9) if math.isfinite(x) else Fraction(0)


def _check_allocation(costs: dict, sizes: dict, budget, fixed: dict, kind: str, macs, abits) -> tuple[list, list]:
    """:func:`allocate`'s tables, checked: ``(layers to allocate, candidate bit-widths)``."""
    if kind not in BUDGET_KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; valid: {', '.join(BUDGET_KINDS)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    layers = [n for n in costs if n not in fixed]
    if not layers:
        raise ValueError("nothing to allocate: every layer of costs is fixed")
    cand = sorted(costs[layers[0]])
    for n in layers:
        if sorted(costs[n]) != cand:
            raise ValueError(f"costs[{n!r}] has bit-widths {sorted(costs[n])}, costs[{layers[0]!r}] has {cand}; "
                             "give every layer the same candidates")
        if not all(math.isfinite(float(v)) for v in costs[n].values()):
            raise ValueError(f"costs[{n!r}] has a non-finite value; measure that layer again")
    for b in cand:
        check_bits(b, "candidate bits")
    for n, b in fixed.items():
        check_bits(b, f"fixed bits of {n!r}")
    missing = [n for n in [*layers, *fixed] if n not in sizes]
    if missing:
        raise ValueError(f"sizes has no entry for {missing[:5]}; give the number of weights of every layer")
    if kind == "bops":
        if macs is None or abits is None:
            raise ValueError("a bops budget needs macs (dnq.mixed.count_macs) and activation bits (abits)")
        missing = [n for n in [*layers, *fixed] if n not in macs]
        if missing:
            raise ValueError(f"macs has no entry for {missing[:5]}")
    return layers, cand


def _tied_groups(layers: list, costs: dict, fixed: dict, tied) -> list[list[str]]:
    """The allocation's variables: the tied groups (fixed layers refused), then every other layer alone."""
    groups: list[list[str]] = []
    seen: set = set()
    for grp in tied or []:
        grp = [n for n in grp if n in costs or n in fixed]
        bad = [n for n in grp if n in fixed]
        if bad and len(grp) > 1:
            raise ValueError(f"tied group {grp} contains fixed layers {bad}; untie them or unfix them")
        grp = [n for n in grp if n in layers and n not in seen]
        if grp:
            groups.append(grp)
            seen.update(grp)
    groups += [[n] for n in layers if n not in seen]

    return groups


def allocate(costs: dict, sizes: dict, budget: float, fixed: dict | None = None, *, kind: str = "avg-bits",
             tied: list | None = None, macs: dict | None = None, abits=None) -> Allocation:
    """Choose one bit-width per layer minimising ``sum_l costs[l][b_l]`` within ``budget``.

    Args:
        costs: ``{layer: {bits: sensitivity}}`` for the layers to allocate; every layer must give
            the same candidate bit-widths. Fixed layers may appear here too (they are ignored).
        sizes: ``{layer: number of weights}`` for every allocated and fixed layer.
        budget: the budget's value in the unit of ``kind``.
        fixed: ``{layer: bits}`` of layers that are not allocated (first and last, by default in
            ``dnq ptq --mixed``); they count in the ``bytes`` and ``bops`` budgets.
        kind: ``"avg-bits"``, ``"bytes"`` or ``"bops"`` (see the module doc).
        tied: groups (lists) of layer names that must get the same bits.
        macs: ``{layer: multiply-accumulates per image}``, needed for ``"bops"``.
        abits: activation bits, an int for every layer or ``{layer: bits}``, needed for ``"bops"``.

    Returns:
        An :class:`Allocation`: an optimal solution of the integer program (HiGHS with a zero
        relative gap), its budget checked in exact arithmetic.

    Raises:
        InfeasibleBudgetError: a budget below the smallest feasible one (the message names the
            smallest and the largest useful budgets).
        ValueError: inconsistent tables (missing sizes, different bit sets, a tied group with a
            fixed layer, missing MACs for ``bops``, non-finite costs).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    fixed = dict(fixed or {})
    layers, cand = _check_allocation(costs, sizes, budget, fixed, kind, macs, abits)
    a_of = (lambda n: abits[n]) if isinstance(abits, dict) else (lambda n: abits)

    groups = _tied_groups(layers, costs, fixed, tied)  # tied layers share one variable per bit-width

    def weight(n: str, b: int) -> Fraction:  # the budget's resource of layer n at b bits, exact
        if kind == "avg-bits":
            return Fraction(int(sizes[n]) * b)
        if kind == "bytes":
            return Fraction(int(sizes[n]) * b, 8)
        return _int_ratio(float(macs[n])) * b * a_of(n)

    fixed_use = sum((weight(n, b) for n, b in fixed.items()), Fraction(0)) if kind != "avg-bits" else Fraction(0)
    if kind == "avg-bits":
        total = sum(int(sizes[n]) for n in layers)
        cap = _int_ratio(float(budget)) * total
        scale = Fraction(1, total)
    else:
        cap = _int_ratio(float(budget)) - fixed_use
        scale = Fraction(1)
    lo = sum((min(sum((weight(n, b) for n in g), Fraction(0)) for b in cand) for g in groups), Fraction(0))
    hi = sum((max(sum((weight(n, b) for n in g), Fraction(0)) for b in cand) for g in groups), Fraction(0))
    min_budget = float(lo * scale + (fixed_use if kind != "avg-bits" else 0))
    max_budget = float(hi * scale + (fixed_use if kind != "avg-bits" else 0))
    if cap < lo:
        raise InfeasibleBudgetError(
            f"{kind} budget {budget:g} is infeasible: the smallest feasible budget is {min_budget:.6g} (every "
            f"allocated layer at {cand[0]} bits{'' if kind == 'avg-bits' else ', fixed layers included'}) and from "
            f"{max_budget:.6g} every layer gets {cand[-1]} bits; choose a budget in [{min_budget:.6g}, "
            f"{max_budget:.6g}]")

    G, B = len(groups), len(cand)
    c = np.array([sum(float(costs[n][b]) for n in g) for g in groups for b in cand])
    w = [sum((weight(n, b) for n in g), Fraction(0)) for g in groups for b in cand]
    # the budget row in integers where possible (exact); a common denominator keeps it exact
    den = math.lcm(*[f.denominator for f in [*w, cap]])
    w_int = np.array([float(f * den) for f in w])
    one_per = np.zeros((G, G * B))
    for i in range(G):
        one_per[i, i * B:(i + 1) * B] = 1
    cons = [LinearConstraint(one_per, 1, 1), LinearConstraint(w_int[None, :], -np.inf, float(cap * den))]
    res = milp(c, integrality=np.ones(G * B), bounds=Bounds(0, 1), constraints=cons, options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise RuntimeError(f"the integer program found no solution ({res.message}); please report this")
    x = np.rint(res.x).astype(int).reshape(G, B)
    choice = [cand[int(np.argmax(row))] for row in x]
    used = sum((sum((weight(n, b) for n in g), Fraction(0)) for g, b in zip(groups, choice)), Fraction(0))
    if used > cap:  # the solver's tolerance let a hair through: never report a broken budget
        raise RuntimeError(f"the integer program's solution exceeds the budget ({float(used)} > {float(cap)}); "
                           "please report this")
    bits = {n: b for g, b in zip(groups, choice) for n in g}
    return _summary(bits, fixed, costs, sizes, kind, budget, macs, a_of, min_budget, max_budget, res.message,
                    groups)


def _summary(bits, fixed, costs, sizes, kind, budget, macs, a_of, min_budget, max_budget, status, groups):
    n_alloc = sum(int(sizes[n]) for n in bits)
    all_bits = {**fixed, **bits}
    n_all = sum(int(sizes[n]) for n in all_bits)
    bops = None
    if macs is not None and all(n in macs for n in all_bits):
        try:
            bops = float(sum(float(macs[n]) * b * a_of(n) for n, b in all_bits.items()))
        except (KeyError, TypeError):
            bops = None
    return Allocation(
        bits=bits, fixed=fixed, objective=float(sum(float(costs[n][b]) for n, b in bits.items())), kind=kind,
        budget=float(budget), avg_bits=sum(int(sizes[n]) * b for n, b in bits.items()) / n_alloc,
        avg_bits_all=sum(int(sizes[n]) * b for n, b in all_bits.items()) / n_all,
        bytes=sum(int(sizes[n]) * b for n, b in all_bits.items()) / 8, bops=bops, min_budget=min_budget,
        max_budget=max_budget, status=str(status), groups=[list(g) for g in groups])


def count_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every Conv/Linear layer, from one traced forward pass.

    Convolution: ``output elements * in_channels / groups * kernel size``; linear:
    ``output elements * in_features`` (per image: divided by the batch size). The model's mode
    is restored and nothing in it changes.
    """
    macs: dict[str, int] = {}
    n = len(example_input)

    def hook(mod, args, out, name):
        per = out.numel() // max(n, 1)
        if isinstance(mod, nn.Linear):
            macs[name] = macs.get(name, 0) + per * mod.in_features
        else:
            k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            macs[name] = macs.get(name, 0) + per * k

    _hooked_pass(model, example_input, [m.register_forward_hook(lambda mod, a, o, name=name: hook(mod, a, o, name))
                                        for name, m in quant_layers(model)])
    return macs


def _hooked_pass(model: nn.Module, example_input: torch.Tensor, handles: list) -> None:
    """One forward pass in eval mode with ``handles`` attached; they are removed and the mode
    restored afterwards, whatever happens."""
    was = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was)


@torch.no_grad()
def shared_input_groups(model: nn.Module, example_input: torch.Tensor) -> list[list[str]]:
    """Groups of Conv/Linear layers that read the same input tensor in a forward pass (a
    residual block's first convolution and its shortcut convolution): candidates for ``tied``.
    Only groups of two or more are returned."""
    seen: dict[tuple, list[str]] = {}
    alive: list[torch.Tensor] = []  # held until the pass ends, so no address is reused by another tensor

    def hook(mod, args, name):
        x = args[0]
        alive.append(x)
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        seen.setdefault(key, [])
        if name not in seen[key]:
            seen[key].append(name)

    _hooked_pass(model, example_input, [m.register_forward_pre_hook(lambda mod, a, name=name: hook(mod, a, name))
                                        for name, m in quant_layers(model)])
    return [g for g in seen.values() if len(g) > 1]


def _entry_tables(entry: dict, first_last_bits: int | None, abits: int):
    order = sorted(entry["layers"], key=lambda d: d["order"])
    names = [d["name"] for d in order]
    sizes = {d["name"]: int(d["numel"]) for d in order}
    macs = {d["name"]: int(d["macs"]) for d in order}
    fixed = {} if first_last_bits is None or not names else {names[0]: first_last_bits, names[-1]: first_last_bits}
    act = {n: (fixed[n] if n in fixed else abits) for n in names}
    return names, sizes, macs, fixed, act


def plan(entry: dict, objective: str, budget: float, *, kind: str = "avg-bits", first_last_bits: int | None = 8,
         abits: int = 4, tied: list | None = None) -> Allocation:
    """The allocation of a sensitivity entry (:func:`landscape.sensitivity_run.measure_sensitivity`)
    for one objective and budget: the first and last layers (execution order) fixed at
    ``first_last_bits`` (weights and activations), every other layer's activations at ``abits``.

    Raises:
        ValueError: an unknown objective, or one the entry lacks; InfeasibleBudgetError.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective not in entry:
        raise ValueError(f"the sensitivity entry has no {objective!r} table; measure it with `landscape sensitivity`")
    check_bits(abits, "activation bits")
    names, sizes, macs, fixed, act = _entry_tables(entry, first_last_bits, abits)
    costs = {n: {int(b): float(v) for b, v in entry[objective][n].items()} for n in names if n not in fixed}
    return allocate(costs, sizes, budget, fixed, kind=kind, tied=tied, macs=macs, abits=act)


def allocations(entry: dict, budgets, objectives, *, first_last_bits: int | None = 8, abits: int = 4,
                tied: list | None = None):
    """Every ``(kind, budget, objective, allocation)`` of a sensitivity entry, budgets outer and
    objectives inner: the one loop behind ``dnq ptq --mixed`` and the study's mixed precision.

    Args:
        entry: a sensitivity entry (:mod:`dnq.sensitivity_file`).
        budgets: ``(kind, budget)`` pairs (:func:`parse_budgets`).
        objectives: names from :data:`OBJECTIVES`.
        first_last_bits, abits, tied: as in :func:`plan`.

    Yields:
        ``(kind, budget, objective, Allocation)``.
    """
    for kind, budget in budgets:
        for objective in objectives:
            yield kind, budget, objective, plan(entry, objective, budget, kind=kind, first_last_bits=first_last_bits,
                                                abits=abits, tied=tied)
