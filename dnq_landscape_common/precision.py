"""Full float32 precision for the instruments and the quantizers, whatever the user's TF32 and autocast settings.

On Ampere and later GPUs, float32 convolutions run in TF32 by default
(``torch.backends.cudnn.allow_tf32`` is True), and many users also allow it for matrix products
(``torch.backends.cuda.matmul.allow_tf32 = True``, ``torch.set_float32_matmul_precision("high")``,
or the newer ``torch.backends.*.fp32_precision = "tf32"``). TF32 keeps 10 mantissa bits, a
relative precision of about 1e-3: enough for training, not for Hessian products, whose
curvature signal is a small difference of large terms. An autocast region around a call would
be worse still (bf16: 8 bits).

:func:`full_precision` is the scope every instrument runs in. On entry it turns TF32 (and
oneDNN's bf16 / TF32 for float32 on the CPU) off for matrix products, convolutions and RNNs,
through both of PyTorch's interfaces so that they agree (the legacy ``allow_tf32`` flags and
``float32_matmul_precision``, and, where PyTorch has it (2.9 and later), the per-backend
``fp32_precision`` tree), and disables every active autocast. On exit, also on an exception,
it puts every flag back as it found it: each node of the ``fp32_precision`` tree with its own
value (``"none"``, following its parent, stays ``"none"``), the legacy matmul precision and
cuDNN flag (read even where a mix of the two interfaces makes PyTorch's getters raise), and
the autocast state. Entries nest (and may come from several threads): the outermost one
saves and restores; each entry enforces full precision again.

One marker cannot be rewritten from Python: PyTorch starts cuDNN's ``conv`` and ``rnn`` nodes
in an internal "default" state that reads ``"tf32"`` but follows a parent set later. Turning
the legacy cuDNN flag off (needed so that ``torch.backends.cudnn.allow_tf32`` reads False
inside, not raise) overwrites it; on exit such a node is set to ``"none"`` (following its
parent, as before) when that reads as it did, else to the value it read. Every getter then
reads what it read before; only a later change of a parent node would be followed differently.

The flags are process-wide (as ``torch.backends`` flags always are): other threads running
at the same time compute in full precision too.

Example:
    >>> import torch
    >>> from dnq_landscape_common.precision import full_precision
    >>> torch.backends.cuda.matmul.allow_tf32 = True
    >>> with full_precision():
    ...     torch.backends.cuda.matmul.allow_tf32
    False
    >>> torch.backends.cuda.matmul.allow_tf32
    True
    >>> torch.backends.cuda.matmul.allow_tf32 = False
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

__all__ = ["full_precision"]

# the fp32_precision tree of PyTorch >= 2.9: generic -> {cuda, mkldnn} -> {matmul, conv, rnn}
_NEW_API = hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(torch._C, "_set_fp32_precision_setter")
_BACKENDS = ("cuda", "mkldnn")
_LEAVES = tuple((b, op) for b in _BACKENDS for op in ("matmul", "conv", "rnn"))
_DEFAULT = "<default>"  # PyTorch's initial, not settable, state of a node that follows its parent or reads "tf32"
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")

_lock = threading.Lock()
_depth = 0
_saved: _State | None = None


@dataclass(frozen=True)
class _State:
    """The precision flags as found: ``nodes`` (new interface) by ``(backend, op)``, their
    readings, and the legacy matmul precision and cuDNN flag."""

    nodes: dict
    readings: dict
    matmul_precision: str
    cudnn_tf32: bool


def _get(node) -> str:
    return torch._C._get_fp32_precision_getter(*node)


def _set(node, value: str) -> None:
    torch._C._set_fp32_precision_setter(*node, value)


def _own_value(node, parent, raw: dict) -> str:
    """The value stored in ``node`` itself: getters resolve ``"none"`` to the parent's value, so
    set the parent to two different values and see whether the reading follows."""
    seen = []
    for probe in ("ieee", "tf32"):
        _set(parent, probe)
        seen.append(_get(node))
    _set(parent, raw[parent])
    if seen[0] == seen[1]:
        return seen[0]
    # it follows its parent: "none", or the initial state that reads "tf32" with no parent set
    chain = [parent, ("generic", "all")] if parent != ("generic", "all") else [parent]
    for p in chain:
        _set(p, "none")
    alone = _get(node)
    for p in chain:
        _set(p, raw[p])
    return "none" if alone == "none" else _DEFAULT


def _snapshot() -> _State:
    """Read every flag without changing any (each probe is undone)."""
    if not _NEW_API:
        return _State({}, {}, torch.get_float32_matmul_precision(), bool(torch._C._get_cudnn_allow_tf32()))
    generic = ("generic", "all")
    raw = {generic: _get(generic)}
    readings = {generic: raw[generic]}
    for b in _BACKENDS:
        readings[(b, "all")] = _get((b, "all"))
        raw[(b, "all")] = _own_value((b, "all"), generic, raw)
    for leaf in _LEAVES:
        readings[leaf] = _get(leaf)
        raw[leaf] = _own_value(leaf, (leaf[0], "all"), raw)
    # the legacy values, read where the new ones cannot make the getters raise (a mix of the two
    # interfaces does): with IEEE leaves the matmul precision always reads, and the cuDNN flag
    # reads only if it is False
    try:
        for leaf in _LEAVES:
            _set(leaf, "ieee")
        matmul = torch.get_float32_matmul_precision()
        try:
            cudnn = bool(torch._C._get_cudnn_allow_tf32())
        except RuntimeError:  # "mix of the legacy and new APIs": conv and rnn are IEEE, so the flag is True
            cudnn = True
    finally:
        for leaf in _LEAVES:
            _write(leaf, raw[leaf], readings[leaf])
    return _State(raw, readings, matmul, cudnn)


def _write(node, value: str, reading: str) -> None:
    if value != _DEFAULT:
        _set(node, value)
        return
    _set(node, "none")
    if _get(node) != reading:
        _set(node, reading)


def _enforce() -> None:
    """Full float32 precision through both interfaces, consistent so that no getter raises."""
    torch._C._set_float32_matmul_precision("highest")  # legacy HIGHEST; cuda and mkldnn matmul IEEE
    torch._C._set_cudnn_allow_tf32(False)
    if _NEW_API:
        for leaf in _LEAVES:
            _set(leaf, "ieee")


def _restore(state: _State) -> None:
    torch._C._set_float32_matmul_precision(state.matmul_precision)
    torch._C._set_cudnn_allow_tf32(state.cudnn_tf32)  # legacy setters write some nodes: the nodes go last
    if _NEW_API:
        for node, value in state.nodes.items():  # parents before leaves
            _write(node, value, state.readings[node])


def _autocast_enabled(device: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device))
    except (TypeError, RuntimeError):  # PyTorch < 2.4, or a device type without autocast
        if device == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device == "cuda" and bool(torch.is_autocast_enabled())


@contextlib.contextmanager
def full_precision():
    """Run the enclosed code with TF32 and reduced-precision float32 kernels off and no autocast.

    Turns TF32 off for cuBLAS matrix products and cuDNN convolutions and RNNs (and oneDNN's bf16
    and TF32 float32 modes), through the legacy flags and the ``fp32_precision`` interface alike,
    and disables autocast on every device type where it is active; restores every one of these
    settings exactly on exit, also when the enclosed code raises (see the module doc). Nests; also
    usable as a decorator (``@full_precision()``).

    Yields:
        None.
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _snapshot()
        _depth += 1
        try:
            _enforce()
        except BaseException:
            _depth -= 1
            if _depth == 0:
                _restore(_saved)
                _saved = None
            raise
    try:
        with contextlib.ExitStack() as stack:
            for dev in _AUTOCAST_DEVICES:
                if _autocast_enabled(dev):
                    stack.enter_context(torch.autocast(dev, enabled=False))
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                state, _saved = _saved, None
                _restore(state)
