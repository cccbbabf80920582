"""Hessian quadratic forms ``z^T H z`` by second-order forward mode (Taylor mode).

Hutchinson's estimator only needs the quadratic forms ``z^T H z``, never the vectors ``H z``.
``z^T H z`` is the second derivative of ``t -> L(w + t z)`` at ``t = 0``, and it can be
propagated forward through the network as a truncated Taylor series ``(x, x', x'')`` of every
activation (Griewank & Walther, *Evaluating Derivatives*, 2nd ed., 2008, ch. 13). For a layer
that is linear in its weight, ``y = f(x, W)``::

    y'  = f(x', W) + f(x, W')
    y'' = f(x'', W) + 2 f(x', W')          (W'' = 0)

four products per probe against the six of a forward-over-reverse Hessian-vector product (a
tangent forward, two; a tangent backward, four), and the primal forward is shared by the whole
block. A gradient costs three, so a quadratic form costs about 4/3 of a gradient per probe
instead of 2. Nested ``torch.func.jvp`` computes the same number but pays for a redundant
mixed term (eight products); PyTorch has no Taylor mode, hence this module.

The model is traced once with :mod:`torch.fx` and interpreted with a rule per operation:
convolutions, linear layers and other multilinear operations (Leibniz rule), BatchNorm in eval
mode, elementwise activations (derivatives from the primal with ``torch.func.jvp``),
max-pooling (the primal's argmax), and every operation linear in its one differentiated input
(pooling, reshapes, indexing: ``torch.func.vmap`` over the probes). The loss must be mean
cross-entropy (class indices or probabilities, label smoothing allowed) or mean squared error.
Anything else raises :class:`UnsupportedError`; :class:`~landscape.HessianOperator` then falls
back to exact Hessian-vector products, and it checks this path against them before using it.

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape.taylor import TaylorQuadratic
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> tq = TaylorQuadratic(model, nn.functional.cross_entropy, [n for n, _ in model.named_parameters()])
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> V = {n: torch.randn(2, *p.shape) for n, p in model.named_parameters()}
    >>> tq(x, y, V).shape
    torch.Size([2])
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from .precision import full_precision


@contextlib.contextmanager
def quiet_forward_ad():
    """Silence two warnings PyTorch itself raises here, and nothing else: the ``torch.jit.script``
    deprecation when forward-mode AD loads its decompositions (PyTorch 2.14, first ``jvp``), and
    vmap's "performance drop" note for ops without a batching rule (the method choice in
    :class:`~landscape.HessianOperator` times every path and keeps the fastest, so a slow one is
    not used)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule", category=UserWarning)
        yield


class UnsupportedError(NotImplementedError):
    """The model or loss has an operation without a Taylor-mode rule here."""


# -- operation tables -------------------------------------------------------------------------
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU,
                nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.CELU, nn.SELU)
_PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
_ACT_FUNCS = {F.relu: True, torch.relu: True, F.relu6: True, F.leaky_relu: True, F.hardtanh: True,
              F.gelu: False, torch.tanh: False, torch.sigmoid: False, F.silu: False, F.elu: False,
              F.softplus: False, F.hardswish: False, F.mish: False, torch.exp: False}
_ACT_METHODS = {"relu": True, "tanh": False, "sigmoid": False, "exp": False}
_LINEAR_MODULES = (nn.Flatten, nn.Unflatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d,
                   nn.AvgPool2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Upsample, nn.ZeroPad2d)
_LINEAR_FUNCS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                 F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, F.dropout, F.pad,
                 operator.getitem, torch.mean, torch.sum, operator.neg, torch.neg, torch.chunk, torch.split}
_LINEAR_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                   "mean", "sum", "chunk", "split", "expand", "neg", "unflatten", "__getitem__"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}


def _lift(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a tangent ``(k, *s)`` as ``(k, 1, ..., 1, *s)`` with ``ndim`` dims after ``k``."""
    return t.reshape(t.shape[:1] + (1,) * (ndim - (t.dim() - 1)) + t.shape[1:])


def _plus(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _scale(a, c):
    return None if a is None else a * c


class TaylorQuadratic:
    """Quadratic forms ``v_i^T Hess(L_batch) v_i`` of one batch, for a block of directions ``V``.

    Args:
        model: the network (traced with :mod:`torch.fx` on construction; run in its current mode,
            so put it in eval mode first).
        loss_fn: ``F.cross_entropy``, ``F.mse_loss``, or an ``nn.CrossEntropyLoss`` /
            ``nn.MSELoss`` (mean or sum reduction: the forms are always those of the batch's
            *mean* loss; :class:`landscape.HessianOperator` weights them by the reduction).
        names: the differentiated parameters (others are constants).
        free: drop each value (an activation and its ``k`` tangents) right after its last use in
            the graph, as an eager backward frees saved tensors: memory is held for the values
            alive at one time, not for the whole graph. ``False`` keeps every value to the end of
            the pass (for comparisons); results are identical either way.

    Attributes:
        peak_bytes: after a call, the largest activation of the batch (one primal; a tangent is
            ``k`` times that).
        peak_live_bytes: after a call, the most bytes the interpreter held at once: the storages of
            every value it kept (primals and tangents, the input and parameters included), each
            storage counted once.
        output_finite: after a call, a 0-d boolean tensor on the model's device: whether every
            output of the batch was finite (read by the caller, so that no call waits for the device).

    Raises:
        UnsupportedError: the model cannot be traced, or the loss is not one of the above.
        Operations without a rule raise it at the first call.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, names, *, free: bool = True):
        self.loss_kind, self.smoothing, self.ignore_index = _loss_kind(loss_fn)
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "no Taylor mode"
            raise UnsupportedError(f"torch.fx cannot trace the model: {type(e).__name__}: {e}") from None
        self.model, self.names, self.free = model, set(names), free
        self.peak_bytes = self.peak_live_bytes = 0
        self.output_finite = torch.ones((), dtype=torch.bool)
        self._nodes = list(self.gm.graph.nodes)
        self._dead_after = _last_uses(self._nodes)
        self.modules = dict(self.gm.named_modules())
        self.fused, self.folded = {}, set()  # layer -> the eval-mode BatchNorm that is its only user
        for node in self.gm.graph.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            if not isinstance(self.modules[node.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(self.modules[user.target], nn.modules.batchnorm._BatchNorm) \
                    and len(user.args) == 1 and not user.kwargs:
                self.fused[node.target] = user.target
                self.folded.add(user.target)

    # -- the interpreter ----------------------------------------------------------------------
    @full_precision()
    def __call__(self, x, y, V: dict) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise UnsupportedError(f"Taylor mode takes one tensor input, got {type(x).__name__}")
        with torch.no_grad(), quiet_forward_ad():
            return self._run(x, y, V)

    def _run(self, x, y, V: dict) -> torch.Tensor:
        """``(k,)`` quadratic forms of the batch's mean loss along the ``k`` directions in ``V``
        (a dict by parameter name of ``(k, *shape)`` tensors)."""
        env: dict[str, object] = {}
        live = _LiveBytes()
        k = next(iter(V.values())).shape[0]

        def load(a):
            return fx.node.map_arg(a, lambda n: env[n.name])

        out, peak = None, 0
        for i, node in enumerate(self._nodes):
            if node.op == "output":
                out = load(node.args[0])
            else:
                if node.op == "placeholder":
                    v = (x, None, None)
                elif node.op == "get_attr":
                    v = self._attr(node.target, V)
                else:
                    v = self._node(node, load(node.args), load(node.kwargs), V)
                    if _is_triple(v):
                        peak = max(peak, v[0].numel() * v[0].element_size())
                env[node.name] = v
                live.add(v)  # the node's inputs are still held: the peak is taken here
            if self.free:
                for name in self._dead_after[i]:
                    live.remove(env.pop(name))
        self.peak_bytes = peak  # the largest activation of this batch: a tangent is k times that
        self.peak_live_bytes = live.peak
        env.clear()  # free the values now (not `del env`: the closure `load` still refers to it)
        del live
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], torch.Tensor)):
            raise UnsupportedError("the model must return one tensor")
        z0, z1, z2 = out
        self.output_finite = torch.isfinite(z0).all()  # on the device: the caller reads it with the forms
        if z1 is None:
            return torch.zeros(k, dtype=z0.dtype, device=z0.device)
        return self._loss(z0, z1, z2, y)

    def _attr(self, target: str, V):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if target in self.names:
            return (obj, V[target], None)
        return (obj, None, None)

    def _param(self, prefix: str, attr: str, V):
        full = f"{prefix}.{attr}" if prefix else attr
        mod = self.modules[prefix]
        t = getattr(mod, attr, None)
        if t is None:
            return None, None
        return t, (V[full] if full in self.names else None)

    def _node(self, node, args, kwargs, V):
        # constants (shapes, sizes, tensors without a tangent) are computed as they are
        def has_tangent(a):
            return isinstance(a, tuple) and len(a) == 3 and (a[1] is not None or a[2] is not None)

        flat = list(args) + list(kwargs.values())
        flat = [e for a in flat for e in (a if isinstance(a, (list, tuple)) and not _is_triple(a) else [a])]
        primal_args = _primal(args)
        primal_kwargs = _primal(kwargs)
        params_have_tangent = node.op == "call_module" and any(
            f"{m}.{n}" in self.names for m in (node.target, self.fused.get(node.target)) if m is not None
            for n, _ in self.modules[m].named_parameters(recurse=False))
        metadata = (node.op == "call_method" and node.target in ("size", "dim", "numel", "type", "is_contiguous")) or \
            (node.op == "call_function" and node.target is getattr and args[1] in ("shape", "dtype", "device", "ndim"))
        if metadata or (not any(has_tangent(a) for a in flat) and not params_have_tangent):
            if node.op == "call_module":
                return (self.modules[node.target](*primal_args, **primal_kwargs), None, None)
            if node.op == "call_function":
                return _wrap(node.target(*primal_args, **primal_kwargs))
            return _wrap(getattr(primal_args[0], node.target)(*primal_args[1:], **primal_kwargs))
        if node.op == "call_module":
            return self._module(node.target, args, kwargs, V)
        if node.op == "call_function":
            return self._function(node.target, args, kwargs)
        return self._method(node.target, args, kwargs)

    def _module(self, target, args, kwargs, V):
        mod = self.modules[target]
        if kwargs or len(args) != 1:
            raise UnsupportedError(f"module {target} ({type(mod).__name__}) called with several inputs")
        x = args[0]
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return self._layer(target, mod, x, V)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and target in self.folded:
            return x  # already applied by the layer before it
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.training or mod.running_mean is None:
                raise UnsupportedError(f"{target}: BatchNorm needs eval mode and running statistics")
            return self._batchnorm(target, mod, x, V)
        if isinstance(mod, _ACT_MODULES):
            if getattr(mod, "inplace", False):
                def fn(u):
                    return mod(u.clone())
            else:
                fn = mod
            return _elementwise(fn, x, isinstance(mod, _PIECEWISE_LINEAR))
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)):
            fn = F.max_pool1d if isinstance(mod, nn.MaxPool1d) else F.max_pool2d
            return _maxpool(lambda u: fn(u, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                                         return_indices=True), x)
        if isinstance(mod, _LINEAR_MODULES) or (isinstance(mod, nn.Sequential) and len(mod) == 0):
            if any(True for _ in mod.parameters()):
                raise UnsupportedError(f"{target}: {type(mod).__name__} with parameters")
            per_sample = not isinstance(mod, (nn.Flatten, nn.Unflatten)) or \
                (mod.start_dim if isinstance(mod, nn.Flatten) else mod.dim) not in (0, -x[0].dim())
            return _linear(mod, x, (), {}, per_sample=per_sample)
        raise UnsupportedError(f"no Taylor-mode rule for module {target} ({type(mod).__name__})")

    def _layer(self, target, mod, x, V):
        """The Taylor series through a Conv/Linear layer (with the BatchNorm after it folded in)."""
        w, w1 = self._param(target, "weight", V)
        b, b1 = self._param(target, "bias", V)
        if isinstance(mod, nn.Linear):
            def f(u, W):
                return F.linear(u, W)
        else:
            if mod.padding_mode != "zeros":
                raise UnsupportedError(f"{target}: padding_mode {mod.padding_mode!r}")
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]

            def f(u, W):
                return conv(u, W, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        wt, bt = (w, w1, None), (b, b1, None)
        if target in self.fused:  # fold the following BatchNorm into the layer's Taylor series
            wt, bt = self._fold_bn(self.fused[target], wt, bt, V)
        if isinstance(mod, nn.Conv2d) and mod.groups == 1:
            return _affine(f, x, wt, bt, 1, conv2d=_Conv2dFolded(mod))
        return _affine(f, x, wt, bt, -1 if isinstance(mod, nn.Linear) else 1)

    def _fold_bn(self, bn_name, wt, bt, V):
        """Taylor series of the weight and bias of ``BN(conv(x, W) + b)`` seen as one layer.

        With ``s = 1/sqrt(var + eps)``, ``W~ = W s g``, ``b~ = (b - mean) s g + beta``, so
        ``W~' = W' s g + W s g'``, ``W~'' = 2 W' s g'`` (and the same for ``b~``): the BatchNorm
        costs nothing on the large activation tangents."""
        bn = self.modules[bn_name]
        (w, w1, _), (b, b1, _) = wt, bt
        s = torch.rsqrt(bn.running_var + bn.eps)
        g, g1 = self._param(bn_name, "weight", V)
        beta, beta1 = self._param(bn_name, "bias", V)
        sg = s if g is None else s * g
        b_in = -bn.running_mean if b is None else b - bn.running_mean

        def per_out(v):  # a (C,) or (k, C) vector against a (C, ...) weight
            return v.view(*v.shape, *[1] * (w.dim() - 1))

        W0 = w * per_out(sg)
        B0 = b_in * sg + (beta if beta is not None else 0)
        W1 = B1 = W2 = B2 = None
        if w1 is not None:
            W1 = w1 * per_out(sg)
        if b1 is not None:
            B1 = b1 * sg
        if g1 is not None:
            sg1 = s * g1  # (k, C)
            W1 = _acc(W1, w * per_out(sg1))
            B1 = _acc(B1, b_in * sg1)
            if w1 is not None:
                W2 = 2 * w1 * per_out(sg1)
            if b1 is not None:
                B2 = 2 * b1 * sg1
        if beta1 is not None:
            B1 = _acc(B1, beta1)  # a probe slice itself when alone: only ever read, never written
        return (W0, W1, W2), (B0, B1, B2)

    def _batchnorm(self, target, mod, x, V):
        """``y = xh * g + b`` with ``xh = (x - mean) * s``; per-channel scales are combined before
        they touch the large tangents: ``y' = x' (s g) + xh g' + b'``, ``y'' = x'' (s g) + x' (2 s g')``."""
        x0, x1, x2 = _triple(x)
        shape = [1] * x0.dim()
        shape[1] = -1
        s = torch.rsqrt(mod.running_var + mod.eps)
        g, g1 = self._param(target, "weight", V)
        b, b1 = self._param(target, "bias", V)
        sg = s if g is None else s * g
        y0 = F.batch_norm(x0, mod.running_mean, mod.running_var, g, b, False, 0.0, mod.eps)
        y1 = None if x1 is None else x1 * sg.view(shape)
        y2 = None if x2 is None else x2 * sg.view(shape)
        k = x1.shape[0] if x1 is not None else (g1 if g1 is not None else b1).shape[0]
        pshape = [k, 1, -1, *[1] * (x0.dim() - 2)]  # a (k, C) parameter tangent against (k, B, C, ...)
        if g1 is not None:
            xh = (x0 - mod.running_mean.view(shape)) * s.view(shape)
            y1 = _acc(y1, xh * g1.view(pshape))
            if x1 is not None:
                y2 = _acc(y2, x1 * (2 * s * g1).view(pshape))
        if b1 is not None:
            y1 = _acc(y1, b1.view(pshape)) if y1 is not None else b1.view(pshape).expand(k, *x0.shape).clone()
        return y0, y1, y2

    def _function(self, fn, args, kwargs):
        if fn in _ADD_FUNCS:
            a, b = args[0], args[1]
            alpha = kwargs.get("alpha", 1)
            sign = -1 if fn in (operator.sub, operator.isub, torch.sub) else 1
            c = sign * alpha
            if _is_triple(a) and _is_triple(b):
                return (fn(a[0], b[0], **kwargs) if kwargs else (a[0] + c * b[0]),
                        _plus(_bcast(a[1], a, b), _scale(_bcast(b[1], b, a), c)),
                        _plus(_bcast(a[2], a, b), _scale(_bcast(b[2], b, a), c)))
            if _is_triple(a):
                return (a[0] + c * b, a[1], a[2])
            return (a + c * b[0], _scale(b[1], c), _scale(b[2], c))
        if fn in _MUL_FUNCS:
            a, b = args[0], args[1]
            if _is_triple(a) and _is_triple(b):
                return _mul(a, b)
            t, c = (a, b) if _is_triple(a) else (b, a)
            return (t[0] * c, _scale(t[1], c), _scale(t[2], c))
        if fn in (operator.truediv, torch.div) and _is_triple(args[0]) and not _is_triple(args[1]):
            a, c = args
            return (a[0] / c, _scale(a[1], 1 / c), _scale(a[2], 1 / c))
        if fn in (F.linear, torch.matmul, operator.matmul, torch.bmm, F.conv1d, F.conv2d):
            if kwargs:
                raise UnsupportedError(f"{fn.__name__} with keyword arguments")
            rest = args[2:]
            bias = None
            if fn in (F.linear, F.conv1d, F.conv2d) and rest:
                bias, rest = rest[0], rest[1:]
            return _affine(lambda u, W: fn(u, W, None, *rest) if fn in (F.linear, F.conv1d, F.conv2d) else fn(u, W),
                           _triple(args[0]), _triple(args[1]), (None, None, None) if bias is None else _triple(bias),
                           -1 if fn is F.linear else 1)
        if fn in _ACT_FUNCS:
            x = args[0]
            kw = {k: v for k, v in kwargs.items() if k != "inplace"}
            return _elementwise(lambda u: fn(u, *_primal(args[1:]), **kw), x, _ACT_FUNCS[fn])
        if fn is F.max_pool2d or fn is F.max_pool1d:
            kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
            return _maxpool(lambda u: fn(u, *_primal(args[1:]), **kw, return_indices=True), args[0])
        if fn in (torch.cat, torch.stack):
            return _concat(fn, args, kwargs)
        if fn in _LINEAR_FUNCS:
            if fn is F.dropout and (kwargs.get("training", args[2] if len(args) > 2 else True)):
                raise UnsupportedError("F.dropout in training mode")
            per_sample = fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, F.dropout)
            return _linear(fn, args[0], args[1:], kwargs, per_sample=per_sample)
        raise UnsupportedError(f"no Taylor-mode rule for function {getattr(fn, '__name__', fn)}")

    def _method(self, name, args, kwargs):
        if name in _ACT_METHODS:
            return _elementwise(lambda u: getattr(u, name)(*_primal(args[1:]), **_primal(kwargs)), args[0],
                                _ACT_METHODS[name])
        if name in ("add", "sub", "__add__", "__sub__"):
            return self._function(operator.add if "add" in name else operator.sub, args, kwargs)
        if name in ("mul", "__mul__"):
            return self._function(operator.mul, args, kwargs)
        if name in _LINEAR_METHODS and _is_triple(args[0]) and not any(_is_triple(a) and a[1] is not None
                                                                        for a in args[1:]):
            tname = "reshape" if name == "view" and not any(isinstance(a, torch.dtype) for a in _primal(args[1:])) \
                else name
            return _linear(lambda u, *a, **kw: getattr(u, name)(*a, **kw), args[0], args[1:], kwargs,
                           tangent_fn=lambda u, *a, **kw: getattr(u, tname)(*a, **kw))
        raise UnsupportedError(f"no Taylor-mode rule for method .{name}()")

    # -- the loss -----------------------------------------------------------------------------
    def _loss(self, z0, z1, z2, y) -> torch.Tensor:
        if self.loss_kind == "ce":
            if z0.dim() != 2:
                raise UnsupportedError("cross-entropy needs (batch, classes) outputs")
            p = torch.softmax(z0, dim=1)
            if y.dtype in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
                if bool((y == self.ignore_index).any()):
                    raise UnsupportedError("targets equal to ignore_index")
                t = F.one_hot(y.long(), z0.shape[1]).to(z0.dtype)
            else:
                t = y.to(z0.dtype)
            if self.smoothing:
                t = t * (1 - self.smoothing) + self.smoothing / z0.shape[1]
            pz = (z1 * p).sum(-1)
            q = (z1.square() * p).sum(-1) - pz.square()
            if z2 is not None:
                q = q + (z2 * (p - t)).sum(-1)
            return q.mean(-1)
        r = z0 - y.to(z0.dtype)
        q = 2 * z1.square()
        if z2 is not None:
            q = q + 2 * r * z2
        return q.reshape(q.shape[0], -1).mean(-1)


def _last_uses(nodes) -> list[list[str]]:
    """For each node of a graph (in order), the values whose last use it is: they can be dropped
    once it has run. A value nobody uses is dropped right after it is computed; the output node
    holds nothing of its own."""
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.op != "output":
            last[node.name] = i
        for inp in node.all_input_nodes:
            last[inp.name] = i
    dead: list[list[str]] = [[] for _ in nodes]
    for name, i in last.items():
        dead[i].append(name)
    return dead


def _tensors(v):
    """The tensors inside an environment value (a triple, a constant, nested tuples)."""
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, _Const):
        yield from _tensors(v.v)
    elif isinstance(v, (tuple, list)):
        for e in v:
            yield from _tensors(e)
    elif isinstance(v, dict):
        for e in v.values():
            yield from _tensors(e)


class _LiveBytes:
    """Bytes held by a set of values, each storage counted once however many views refer to it,
    and the peak of that sum."""

    def __init__(self):
        self.refs: dict[int, list[int]] = {}  # storage address -> [bytes, references]
        self.bytes = self.peak = 0

    def add(self, v) -> None:
        for t in _tensors(v):
            st = t.untyped_storage()
            ref = self.refs.get(st.data_ptr())
            if ref is None:
                self.refs[st.data_ptr()] = [st.nbytes(), 1]
                self.bytes += st.nbytes()
            else:
                ref[1] += 1
        self.peak = max(self.peak, self.bytes)

    def remove(self, v) -> None:
        for t in _tensors(v):
            key = t.untyped_storage().data_ptr()
            ref = self.refs[key]
            ref[1] -= 1
            if ref[1] == 0:
                self.bytes -= ref[0]
                del self.refs[key]


def _is_triple(a) -> bool:
    return isinstance(a, tuple) and len(a) == 3 and isinstance(a[0], torch.Tensor) and \
        (a[1] is None or isinstance(a[1], torch.Tensor)) and (a[2] is None or isinstance(a[2], torch.Tensor))


def _wrap(v):
    return (v, None, None) if isinstance(v, torch.Tensor) else _Const(v)


class _Const:
    """A non-tensor value (a size, a tuple of tensors without tangents) in the environment."""

    def __init__(self, v):
        self.v = v


def _primal(a):
    if isinstance(a, _Const):
        return a.v
    if _is_triple(a):
        return a[0]
    if isinstance(a, dict):
        return {k: _primal(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(_primal(v) for v in a)
    return a


def _triple(a):
    if _is_triple(a):
        return a
    if isinstance(a, torch.Tensor):
        return (a, None, None)
    raise UnsupportedError(f"expected a tensor, got {type(a).__name__}")


def _bcast(t, own, other):
    """Lift a tangent so it broadcasts against the other operand's primal."""
    if t is None:
        return None
    return _lift(t, max(own[0].dim(), other[0].dim()))


def _acc(a, b):
    """``a + b``, in place on ``a`` (a fresh tensor of this module's own) when shapes allow."""
    if a is None:
        return b
    if b is None:
        return a
    if a.shape == torch.broadcast_shapes(a.shape, b.shape):
        return a.add_(b)
    return a + b


class _Conv2dFolded:
    """The three kinds of batched products of a 2-D convolution (``groups=1``), with the probes
    folded into the batch or the channels by hand and every tensor in channels-last layout, which
    is faster on the CPU than the contiguous layout ``vmap`` produces (BENCHMARKS.md, "behind the
    defaults")."""

    def __init__(self, mod: nn.Conv2d):
        self.args = (mod.stride, mod.padding, mod.dilation)

    def shared(self, u, w):  # (k, B, ...) inputs, one weight
        out = F.conv2d(u.flatten(0, 1).contiguous(memory_format=torch.channels_last), w, None, *self.args)
        return out.unflatten(0, u.shape[:2])

    def weights(self, x, w):  # one input, (k, Co, ...) weights
        out = F.conv2d(x.contiguous(memory_format=torch.channels_last), w.flatten(0, 1), None, *self.args)
        return out.unflatten(1, w.shape[:2]).movedim(1, 0)

    def pairs(self, u, w):  # (k, B, ...) inputs, (k, Co, ...) weights: a grouped convolution
        k, b = u.shape[:2]
        g = u.movedim(0, 1).reshape(b, k * u.shape[2], *u.shape[3:]).contiguous(memory_format=torch.channels_last)
        out = F.conv2d(g, w.flatten(0, 1), None, *self.args, k)
        return out.unflatten(1, w.shape[:2]).movedim(1, 0)


class _Vmapped:
    """The same three products for any ``f(input, weight)``, batched with ``torch.func.vmap``."""

    def __init__(self, f):
        self.f = f

    def shared(self, u, w):
        return vmap(lambda t: self.f(t, w))(u)

    def weights(self, x, w):
        return vmap(lambda v: self.f(x, v))(w)

    def pairs(self, u, w):
        return vmap(self.f)(u, w)


def _affine(f, x, wt, bt=(None, None, None), ch=None, conv2d=None):
    """``y = f(x, W) + b`` for ``f`` bilinear, with Taylor series for ``x``, ``W`` and ``b``
    (``b`` along dim ``ch``); tangents are ``(k, ...)``. The Leibniz rule::

        y'  = f(x', W) + f(x, W') + b'
        y'' = f(x'', W) + 2 f(x', W') + f(x, W'') + b''

    The factor 2 goes on the smaller of ``x'`` and ``W'``; the two products of the primal input
    with the weight's tangents share one call."""
    x0, x1, x2 = _triple(x)
    w0, w1, w2 = wt
    b0, b1, b2 = bt
    ops = conv2d if conv2d is not None else _Vmapped(f)
    y0 = f(x0, w0)  # the primal keeps the model's own memory layout (a .view() downstream may need it)
    xw1 = xw2 = None
    if w1 is not None and w2 is not None:
        both = ops.weights(x0, torch.cat([w1, w2]))
        xw1, xw2 = both[: len(w1)], both[len(w1):]
    elif w1 is not None:
        xw1 = ops.weights(x0, w1)
    y1 = _acc(None if x1 is None else ops.shared(x1, w0), xw1)
    y2 = _acc(None if x2 is None else ops.shared(x2, w0), xw2)
    if x1 is not None and w1 is not None:
        y2 = _acc(y2, ops.pairs(x1, 2 * w1) if w1.numel() <= x1.numel() else ops.pairs(2 * x1, w1))
    if b0 is None and b1 is None and b2 is None:
        return y0, y1, y2
    shape = [1] * y0.dim()
    shape[ch] = -1
    if b0 is not None:
        y0 = y0 + b0.view(shape)
    k = next((t.shape[0] for t in (x1, w1, b1) if t is not None), None)
    if b1 is not None:
        b1v = b1.view(k, *shape)
        y1 = _acc(y1, b1v) if y1 is not None else b1v.expand(k, *y0.shape).clone()
    if b2 is not None:
        b2v = b2.view(k, *shape)
        y2 = _acc(y2, b2v) if y2 is not None else b2v.expand(k, *y0.shape).clone()
    return y0, y1, y2


def _mul(a, b):
    nd = max(a[0].dim(), b[0].dim())
    a = (a[0], None if a[1] is None else _lift(a[1], nd), None if a[2] is None else _lift(a[2], nd))
    b = (b[0], None if b[1] is None else _lift(b[1], nd), None if b[2] is None else _lift(b[2], nd))
    return _affine(operator.mul, a, b)


def _elementwise(fn, x, piecewise_linear: bool):
    x0, x1, x2 = _triple(x)
    one = torch.ones_like(x0)
    y0, d1 = jvp(fn, (x0,), (one,))
    y1 = None if x1 is None else d1 * x1
    y2 = None if x2 is None else d1 * x2
    if not piecewise_linear and x1 is not None:
        try:
            d2 = jvp(lambda u: jvp(fn, (u,), (torch.ones_like(u),))[1], (x0,), (one,))[1]
        except (RuntimeError, NotImplementedError):  # no forward-over-forward rule (silu, mish): reverse mode
            d2 = grad(lambda u: grad(lambda v: fn(v).sum())(u).sum())(x0)
        y2 = _plus(y2, d2 * x1.square())
    return y0, y1, y2


def _maxpool(fn, x):
    x0, x1, x2 = _triple(x)
    y0, idx = fn(x0)
    flat_idx = idx.flatten(2)

    def pick(t):
        if t is None:
            return None
        g = t.flatten(3).gather(-1, flat_idx.unsqueeze(0).expand(t.shape[0], *flat_idx.shape))
        return g.view(t.shape[0], *y0.shape)

    return y0, pick(x1), pick(x2)


def _linear(fn, x, rest, kwargs, tangent_fn=None, per_sample=False):
    """An operation linear in its one differentiated input: the tangents go through it too.

    ``per_sample`` operations (pooling, ``nn.Flatten``) run on the probes folded into the batch;
    the rest through ``vmap``. ``tangent_fn`` replaces ``fn`` for the tangents (``reshape`` for
    ``view``: the tangents' memory layout is this module's choice, not the model's)."""
    x0, x1, x2 = _triple(x)
    rest, kwargs = _primal(rest), _primal(kwargs)

    def g(u):
        return fn(u, *rest, **kwargs)

    def gt(u):
        return (tangent_fn or fn)(u, *rest, **kwargs)

    y0 = g(x0)
    if not isinstance(y0, torch.Tensor):
        raise UnsupportedError(f"{getattr(fn, '__name__', fn)} returns {type(y0).__name__}, not one tensor")

    def tangent(t):
        if t is None:
            return None
        if per_sample:
            return gt(t.flatten(0, 1)).unflatten(0, t.shape[:2])
        return vmap(gt)(t)

    return y0, tangent(x1), tangent(x2)


def _concat(fn, args, kwargs):
    seq = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    trip = [_triple(t) for t in seq]
    y0 = fn([t[0] for t in trip], dim)
    tdim = dim + 1 if dim >= 0 else dim
    outs = []
    for j in (1, 2):
        if all(t[j] is None for t in trip):
            outs.append(None)
            continue
        k = next(t[j] for t in trip if t[j] is not None).shape[0]
        parts = [t[j] if t[j] is not None else t[0].new_zeros((k, *t[0].shape)) for t in trip]
        outs.append(fn(parts, tdim))
    return y0, outs[0], outs[1]


def _loss_kind(loss_fn):
    if loss_fn is F.cross_entropy:
        return "ce", 0.0, -100
    if loss_fn is F.mse_loss:
        return "mse", 0.0, None
    # a summed loss gets the forms of its batch mean: HessianOperator divides it by the batch size
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction not in ("mean", "sum") or loss_fn.weight is not None:
            raise UnsupportedError("nn.CrossEntropyLoss needs reduction='mean' or 'sum' and no class weights")
        return "ce", float(loss_fn.label_smoothing), loss_fn.ignore_index
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction not in ("mean", "sum"):
            raise UnsupportedError("nn.MSELoss needs reduction='mean' or 'sum'")
        return "mse", 0.0, None
    raise UnsupportedError(f"loss {getattr(loss_fn, '__name__', type(loss_fn).__name__)} has no Taylor-mode rule; "
                           "supported: F.cross_entropy, F.mse_loss, nn.CrossEntropyLoss, nn.MSELoss (mean)")
