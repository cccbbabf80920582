"""One reconstruction step (AdaRound, BRECQ, QDrop) as a static, sync-free function, replayed as a CUDA graph.

:func:`dnq.recon.reconstruct` optimises, unit by unit (a layer or a block), the rounding variables
``V`` and the activation step sizes of the unit on its cached inputs. :class:`UnitStep` is that
optimisation: each step draws a batch, runs the unit forward (soft weights, LSQ activation
quantizers, QDrop's drops), the loss (output error plus AdaRound's rounding regularizer),
backward and Adam. The step is static (same shapes, same tensors every step) and reads nothing
back to the host, so that on a GPU it is captured once in a CUDA graph and replayed:

* the batch indices of every step come from an index table drawn once per unit from the seeded
  CPU generator. The same seed gives the same model on one device. The draws are those of the
  per-step ``randint`` before issue 22 (one call for the unit's steps gives the same indices) and
  QDrop's masks the same ``rand`` draws, but the results differ from that version's: the fused
  gradients are summed in another order and Adam is the fused one, and Adam's sign-like first
  steps amplify the last-bit differences (float32, resnet20's ``layers.0`` at 8x8: 11 of 4,608
  rounding decisions differ after 20 steps; in float64 the rounding variables agree to 2e-5);
* the step sizes' cosine learning rate, the regularizer's annealed exponent ``beta`` and its
  weight (zero during the warm-up) come from device tables indexed by a device step counter;
* Adam is torch's fused Adam (``fused=True``; ``capturable=True`` on CUDA), the step sizes'
  learning rate a 0-dim tensor filled in place from the table. The fused Adam runs on the CPU
  too, with the tensor learning rate read in C++ (no Python-side read); the for-loop Adam
  rejects ``capturable=True`` on a CPU and the foreach Adam a tensor rate without it;
* QDrop's masks come from the device generator (registered with the graph when captured);
* every step writes its loss into a per-unit device buffer; the host reads the buffer every
  :data:`CHECK_EVERY` steps and at the end of the unit, and a NaN or Inf names the unit, the
  stage and the first bad step (:class:`dnq.errors.ReconstructionError`).

The quantizer arithmetic is fused into autograd Functions with hand-written backward passes
(:func:`soft_round`: the soft weights of all the unit's layers and the regularizer from one
``h(V)``; :func:`lsq_quantize`: LSQ fake quantization with QDrop's mix; :func:`recon_loss`), so
that a steady-state QDrop step of a resnet20 block is about 110 aten ops on the CPU, against
260 before (BENCHMARKS.md, "Reconstruction step"). Their values equal the composed formulas of
:mod:`dnq.recon` exactly and their gradients to rounding (tests/dnq/test_recon_step.py).

On CUDA (``cuda_graph=True``) the first :data:`WARMUP_STEPS` steps run eagerly on a side stream
(they are real steps), the next is captured and every later step is one ``replay()``; when the
capture fails the unit runs eagerly and :attr:`UnitStep.why_eager` says why. Cached inputs kept in
host memory (past the device budget) are gathered on the host per step into static device
buffers, outside the graph.

Example:
    The fused LSQ quantizer: the values of the composed formula, QDrop's float elements passed through.

    >>> import torch
    >>> from dnq.recon_step import lsq_quantize
    >>> x = torch.tensor([0.04, 0.26, 2.0, -1.0], requires_grad=True)
    >>> s = torch.tensor(0.1, requires_grad=True)
    >>> q = lsq_quantize(x, s, torch.tensor(0.0), 0, 15, 1.0, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    >>> q.detach().tolist()
    [0.0, 0.25999999046325684, 1.5, 0.0]
    >>> q.sum().backward()
    >>> x.grad.tolist(), round(float(s.grad), 4)
    ([1.0, 1.0, 0.0, 0.0], 14.6)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from .errors import ReconstructionError

ZETA, GAMMA = 1.1, -0.1
"""AdaRound's rectified sigmoid stretch: ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
_EPS = float(torch.finfo(torch.float32).eps)
CHECK_EVERY = 250
"""Steps between the host's reads of the losses (the finite-loss check); a read waits for the GPU."""
WARMUP_STEPS = 3
"""Eager steps on a side stream before the capture (cuDNN's autotuning and the allocator settle)."""


# -- fused quantizer arithmetic ----------------------------------------------------------------
class _SoftRound(torch.autograd.Function):
    """AdaRound's soft weights ``s (clamp(base + h(V) + z, qmin, qmax) - z)`` and the weighted
    regularizer ``coef * sum(1 - |2 h(V) - 1|^beta)`` from one ``h(V)``."""

    @staticmethod
    def forward(ctx, v, base, scale, zero_point, qmin, qmax, beta, coef):
        sig = torch.sigmoid(v)
        stretched = sig * (ZETA - GAMMA) + GAMMA
        h = stretched.clamp(0, 1)
        pre = h + base
        if zero_point is not None:
            pre = pre + zero_point
        q = pre.clamp(qmin, qmax)
        w_clipped = q != pre
        if zero_point is not None:
            q = q - zero_point
        w = q * scale
        a = 2 * h - 1
        absa = a.abs()
        reg = (1 - absa.pow(beta)).sum() * coef
        ctx.save_for_backward(sig, stretched != h, w_clipped, scale, a, absa, beta, coef)
        return w, reg

    @staticmethod
    def backward(ctx, grad_w, grad_reg):
        sig, h_clipped, w_clipped, scale, a, absa, beta, coef = ctx.saved_tensors
        gh = (grad_w * scale).masked_fill_(w_clipped, 0) if grad_w is not None else torch.zeros_like(sig)
        if grad_reg is not None:  # d/dh (1 - |2h - 1|^beta) = -2 beta |2h - 1|^(beta - 1) sign(2h - 1)
            k = grad_reg * coef * (-2 * beta)
            gh = torch.addcmul(gh, absa.pow(beta - 1) * a.sign(), k)
        gv = torch.ops.aten.sigmoid_backward(gh.masked_fill_(h_clipped, 0) * (ZETA - GAMMA), sig)
        return gv, None, None, None, None, None, None, None


def soft_round(v: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               qmin, qmax, beta: torch.Tensor | float = 2.0, coef: torch.Tensor | float = 0.0):
    """AdaRound's soft weights and its weighted rounding regularizer, from one ``h(V)``.

    The values are those of :class:`dnq.recon.AdaRoundWeight` (``"soft"``) and of ``coef *``
    :meth:`~dnq.recon.AdaRoundWeight.round_loss` ``(beta)``; the gradient with respect to ``v``
    is written out (the rectified sigmoid's and both clamps' masks are those of autograd).

    Args:
        v: the rounding variables.
        base, scale: ``floor(W/s)`` and the step sizes, broadcastable to ``v``.
        zero_point: the integer offset (broadcastable), or None where it is zero (symmetric).
        qmin, qmax: the integer range (numbers, or tensors broadcastable to ``v``).
        beta, coef: the regularizer's exponent and weight (0-dim tensors of ``v``'s device, or
            numbers).

    Returns:
        ``(weights, regularizer)``: the soft weights (``v``'s shape) and a 0-dim tensor.
    """
    if not isinstance(beta, torch.Tensor):
        beta = torch.full((), float(beta), dtype=v.dtype, device=v.device)
    if not isinstance(coef, torch.Tensor):
        coef = torch.full((), float(coef), dtype=v.dtype, device=v.device)
    return _SoftRound.apply(v, base, scale, zero_point, qmin, qmax, beta, coef)


class _LSQQuantize(torch.autograd.Function):
    """LSQ fake quantization with QDrop's element-wise mix (the derivation is :func:`lsq_quantize`'s).

    The masks are float (1.0 / 0.0) and applied by arithmetic that is exact for finite values
    (``lerp`` with a 0/1 weight, ``a - b * m``): on a CPU ``where`` and ``masked_fill`` with a bool
    mask cost ten times an element-wise product."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale, keep):
        sg = scale * grad_scale
        s = (scale - sg) + sg  # the value of dnq.recon._grad_scale(scale, g), to the bit
        v = x / s
        t = v + zero_point
        c = t.clamp(qmin, qmax)
        qz = c.round().sub_(zero_point)
        inside = c.eq_(t)  # 1.0 where qmin <= x/s + z <= qmax (autograd's clamp mask), in c's memory
        out = qz * s
        ds = torch.addcmul(qz, v, inside, value=-1)  # d out / d s: round(x/s + z) - z - x/s inside, qmin/qmax - z out
        passed = inside
        if keep is not None:  # keep: 1.0 where the element stays in float
            out = torch.lerp(out, x, keep)
            ds = torch.addcmul(ds, ds, keep, value=-1)  # float elements: no step-size gradient
            if ctx.needs_input_grad[0]:
                passed = torch.maximum(inside, keep)
        ctx.grad_scale = grad_scale
        ctx.save_for_backward(ds, passed if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        ds, passed = ctx.saved_tensors
        gx = grad * passed if ctx.needs_input_grad[0] else None
        gs = (grad * ds).sum() * ctx.grad_scale if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None, None, None


def lsq_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 grad_scale: float = 1.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """LSQ fake quantization (:func:`dnq.recon.lsq_fake_quantize`) as one autograd Function, with QDrop's drops.

    For finite ``x`` the value is :func:`dnq.recon.lsq_fake_quantize`'s to the bit, and ``x``
    itself where ``keep`` is 1. The gradients are LSQ's: with respect to ``x``, 1 where
    ``qmin <= x/s + z <= qmax`` (the unrounded value, bounds included as autograd's clamp has
    them) or the element is kept in float, 0 elsewhere; with respect to the step size,
    ``grad_scale`` times the sum over the quantized elements of ``round(x/s + z) - z - x/s``
    inside the range and ``qmin - z`` / ``qmax - z`` where clipped (float elements contribute
    nothing).

    Args:
        x: the activations.
        scale, zero_point: 0-dim tensors of ``x``'s dtype (the step size is learned).
        qmin, qmax: the integer range.
        grad_scale: LSQ's gradient scale of the step size (``1 / sqrt(numel * qmax)``).
        keep: QDrop's mask in ``x``'s dtype, 1.0 where the element stays in float and 0.0 where it
            is quantized (None: all are quantized).
    """
    return _LSQQuantize.apply(x, scale, zero_point, qmin, qmax, grad_scale, keep)


class _ReconLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):
        d = pred - target
        ctx.save_for_backward(d)
        ctx.count = d.numel() // d.shape[1]
        return d.pow(2).sum(1).mean()

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        g = d * (grad * (2.0 / ctx.count))
        return g, (-g if ctx.needs_input_grad[1] else None)


def recon_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The output error: squared error summed over channels (dim 1), averaged over the batch and
    positions (``(pred - target).pow(2).sum(1).mean()``, its gradient written out)."""
    return _ReconLoss.apply(pred, target)


# -- the schedule ----------------------------------------------------------------------------------
def schedule_tables(iters: int, *, act_lr: float, reg_weight: float, beta: tuple[float, float],
                    warmup: float) -> dict[str, list[float]]:
    """The per-step values the step reads from device tables (host lists, one value per step).

    ``act_lr``: the step sizes' learning rate, cosine-decayed from ``act_lr`` (BRECQ / QDrop code);
    ``beta``: AdaRound's exponent, annealed from ``beta[0]`` to ``beta[1]`` after the warm-up
    (``beta[0]`` during it, unused); ``coef``: the regularizer's weight, 0 during the first
    ``warmup`` fraction of the steps and ``reg_weight`` after.

    Example:
        >>> t = schedule_tables(4, act_lr=1.0, reg_weight=0.01, beta=(20.0, 2.0), warmup=0.5)
        >>> [round(v, 4) for v in t["act_lr"]], t["beta"], t["coef"]
        ([1.0, 0.8536, 0.5, 0.1464], [20.0, 20.0, 20.0, 11.0], [0.0, 0.0, 0.01, 0.01])
    """
    start = warmup * iters
    lrs, betas, coefs = [], [], []
    for i in range(iters):
        lrs.append(act_lr * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
        on = i >= start
        frac = (i - start) / max(iters - start, 1)
        betas.append(beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - frac) if on else beta[0])
        coefs.append(reg_weight if on else 0.0)
    return {"act_lr": lrs, "beta": betas, "coef": coefs}


# -- the step --------------------------------------------------------------------------------------
class UnitStep:
    """The optimisation of one reconstruction unit: static steps, eager or replayed as a CUDA graph.

    Args:
        unit: the unit's module (quantizers attached; eval mode).
        qx, fy: the cached inputs (from the quantized model) and float targets of the unit,
            on ``device`` or in host memory.
        device: where the step runs.
        iters: steps of this unit.
        batch_size: images per step (at most the number cached).
        generator: the CPU generator the index table is drawn from.
        soft: the AdaRound weights (:class:`dnq.recon.AdaRoundWeight`) whose rounding is learned
            (empty: none).
        scales: the LSQ step sizes learned (empty: none).
        weight_lr, act_lr, reg_weight, beta, warmup: as :func:`dnq.recon.reconstruct` has them.
        loss_fn: the output error (``recon_loss``).
        name: the unit and stage, as the error names them.
        cuda_graph: capture the step and replay it (CUDA only).
        forward: the unit's output from its input (default ``unit``; the paper convention's units
            end after their activation and output quantizer).
        fx, mix: QDrop's input mixing (paper convention): the float model's cached inputs of the
            unit and ``(probability of the quantized input, generator)``; each input element is the
            quantized model's with that probability and the float model's otherwise.
        positive_scales: keep the step sizes positive (``|s|``, at least float32's epsilon) before
            every forward, as QDrop's ``LSQFakeQuantize`` does.

    Attributes:
        losses: the loss of every step (a device tensor).
        steps: the steps run so far; ``captured``: whether the step was captured;
        why_eager: why a CUDA graph was asked for and not used (None otherwise).
    """

    def __init__(self, unit: nn.Module, qx: torch.Tensor, fy: torch.Tensor, *, device: torch.device, iters: int,
                 batch_size: int, generator: torch.Generator, soft=(), scales=(), weight_lr: float = 0.0,
                 act_lr: float = 0.0, reg_weight: float = 0.0, beta=(20.0, 2.0), warmup: float = 0.2,
                 loss_fn=recon_loss, name: str = "unit", cuda_graph: bool = False, forward=None,
                 fx: torch.Tensor | None = None, mix: tuple[float, torch.Generator] | None = None,
                 positive_scales: bool = False):
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive integer, got {iters!r}")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        self.unit, self.device, self.iters, self.loss_fn, self.name = unit, device, iters, loss_fn, name
        self.forward = unit if forward is None else forward
        self.fx, self.mix, self.positive = fx, mix, positive_scales
        if (fx is None) != (mix is None):
            raise ValueError("fx and mix go together (QDrop's input mixing)")
        self.soft, self.scales = list(soft), list(scales)
        self.weight_lr, self.act_lr = weight_lr, act_lr
        self.qx, self.fy = qx, fy
        n = len(qx)
        table = torch.randint(0, n, (iters, min(batch_size, n)), generator=generator)
        self.resident = qx.device == device and fy.device == device and (fx is None or fx.device == device)
        self.idx = table.to(device) if self.resident else table
        if not self.resident:  # static device buffers, filled on the host side before each step
            self.xb = torch.empty((table.shape[1], *qx.shape[1:]), dtype=qx.dtype, device=device)
            self.yb = torch.empty((table.shape[1], *fy.shape[1:]), dtype=fy.dtype, device=device)
            self.fb = None if fx is None else torch.empty_like(self.xb)
        tables = schedule_tables(iters, act_lr=act_lr, reg_weight=reg_weight, beta=beta, warmup=warmup)
        self.i = torch.zeros((), dtype=torch.long, device=device)
        self.losses = torch.zeros(iters, dtype=fy.dtype, device=device)
        self.positions = torch.arange(iters, device=device)
        self._soft_setup(tables)
        groups = []
        if self.soft:
            groups.append({"params": [self.v], "lr": weight_lr})
        if self.scales:
            self.lr_table = torch.tensor(tables["act_lr"], dtype=torch.float32, device=device)
            self.lr = self.lr_table[:1].clone()  # float32, 1 element: what the fused Adam reads on CUDA
            groups.append({"params": self.scales, "lr": self.lr})
        self.opt = torch.optim.Adam(groups, fused=True, capturable=device.type == "cuda") if groups else None
        self.params = [p for g in groups for p in g["params"]]
        self.one = None
        self.cuda_graph, self.graph, self.captured, self.why_eager = cuda_graph, None, False, None
        self.steps = 0
        self._checked = 0

    def _soft_setup(self, tables) -> None:
        """The unit's rounding variables as one flat parameter (one ``h(V)`` for all its layers)."""
        self.v = None
        if not self.soft:
            return
        dtype = self.soft[0].v.dtype
        flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
        self.sizes = [w.v.numel() for w in self.soft]
        self.v = nn.Parameter(flat(w.v.detach() for w in self.soft))
        self.base = flat(w.base for w in self.soft)
        self.scale = flat(w.scale.expand_as(w.base) for w in self.soft)
        zps = [w.zero_point.expand_as(w.base) for w in self.soft]
        self.zero_point = flat(zps) if any(bool(z.any()) for z in zps) else None
        ranges = {(w.qmin, w.qmax) for w in self.soft}
        if len(ranges) == 1:
            self.qmin, self.qmax = ranges.pop()
        else:
            self.qmin = flat(torch.full_like(w.base, w.qmin) for w in self.soft)
            self.qmax = flat(torch.full_like(w.base, w.qmax) for w in self.soft)
        self.beta_table = torch.tensor(tables["beta"], dtype=dtype, device=self.device)
        self.coef_table = torch.tensor(tables["coef"], dtype=dtype, device=self.device)

    # -- one step ----------------------------------------------------------------------------------
    def _body(self) -> None:
        i = self.i
        with torch.no_grad():  # a 0-dim integer tensor as a Python index would be read back: index_select
            if self.resident:
                idx = self.idx.index_select(0, i).view(-1)
                x, y = self.qx.index_select(0, idx), self.fy.index_select(0, idx)
                xf = None if self.fx is None else self.fx.index_select(0, idx)
            else:
                x, y, xf = self.xb, self.yb, self.fb
            if xf is not None:  # QDrop: quantized where rand < p (the official code's torch.where)
                p, gen = self.mix
                x = torch.where(torch.rand(x.shape, generator=gen, device=x.device) < p, x, xf)
            if self.positive:
                for s in self.scales:
                    s.abs_().clamp_min_(_EPS)
            if self.scales:
                torch.index_select(self.lr_table, 0, i, out=self.lr)
            if self.soft:
                beta, coef = self.beta_table.index_select(0, i), self.coef_table.index_select(0, i)
        for p in self.params:  # zero_grad(set_to_none=True), without its profiler record
            p.grad = None
        reg = None
        if self.soft:
            w, reg = _SoftRound.apply(self.v, self.base, self.scale, self.zero_point, self.qmin, self.qmax, beta, coef)
            for mod, part in zip(self.soft, w.split(self.sizes)):
                mod.override = part.view(mod.base.shape)
        loss = self.loss_fn(self.forward(x), y)
        if reg is not None:
            loss = loss + reg
        if self.one is None:  # the first step (eager): the seed of the backward pass, kept
            self.one = torch.ones_like(loss)
        loss.backward(self.one)
        self.opt.step()
        with torch.no_grad():
            torch.where(self.positions == i, loss, self.losses, out=self.losses)
            i.add_(1)

    def _gather(self) -> None:
        """The batch of the next step into the static buffers (cached tensors in host memory)."""
        if not self.resident:
            row = self.idx[self.steps]
            self.xb.copy_(self.qx[row], non_blocking=True)
            self.yb.copy_(self.fy[row], non_blocking=True)
            if self.fb is not None:
                self.fb.copy_(self.fx[row], non_blocking=True)

    def step(self) -> None:
        """Run one step (eager, on the side stream while warming up, or as a graph replay)."""
        if self.steps >= self.iters:
            raise RuntimeError(f"{self.name}: all {self.iters} steps have run")
        self._gather()
        if self.graph is not None:
            self.graph.replay()
        elif self.cuda_graph and self.why_eager is None and self.steps >= WARMUP_STEPS:
            self._capture()
            if self.graph is not None:
                self.graph.replay()  # the capture ran nothing: this replay is the step
            else:
                self._body()
        elif self.cuda_graph and self.why_eager is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self._body()
        self.steps += 1

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for q in self._generators():
            graph.register_generator_state(q)
        try:
            with torch.cuda.graph(graph):
                self._body()
        except Exception as e:  # noqa: BLE001 - any failure: run eagerly, and say why
            torch.cuda.synchronize(self.device)
            self.why_eager = f"the capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"{self.name}: CUDA graph not used, {self.why_eager}; running the steps eagerly",
                          stacklevel=3)
            return
        self.graph, self.captured = graph, True

    def _generators(self) -> list[torch.Generator]:
        gens = {id(m.generator): m.generator for m in self.unit.modules()
                if isinstance(getattr(m, "generator", None), torch.Generator) and m.generator.device.type == "cuda"}
        if self.mix is not None and self.mix[1].device.type == "cuda":
            gens[id(self.mix[1])] = self.mix[1]
        return list(gens.values())

    # -- the unit's run --------------------------------------------------------------------------
    def check(self) -> None:
        """Read the losses of the steps run since the last check; a NaN or Inf raises
        :class:`dnq.errors.ReconstructionError` naming the first bad step."""
        new = self.losses[self._checked:self.steps]
        bad = ~torch.isfinite(new)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            value = float(new[first])
            raise ReconstructionError(f"{self.name}: the loss is {value} at step {self._checked + first} of "
                                      f"{self.iters}; lower the learning rates (weight_lr {self.weight_lr}, act_lr "
                                      f"{self.act_lr}) or check the model's weights")
        self._checked = self.steps

    def run(self, bar=None) -> int:
        """Run every step of the unit (checking the losses every :data:`CHECK_EVERY` steps and at the
        end); returns the steps run (0 when nothing is learned)."""
        if self.opt is None:
            return 0
        try:
            while self.steps < self.iters:
                self.step()
                if self.steps % CHECK_EVERY == 0 or self.steps == self.iters:
                    self.check()
                if bar is not None and (self.steps % 50 == 0 or self.steps == self.iters):
                    bar.update(50 if self.steps % 50 == 0 else self.steps % 50)
        finally:
            self.close()
        if self.cuda_graph and not self.captured and self.why_eager is None:
            self.why_eager = f"{self.iters} steps: no more than the {WARMUP_STEPS} eager warm-up steps"
        return self.steps

    def close(self) -> None:
        """Write the learned rounding variables back into the layers and drop the step's graph."""
        self.graph = None
        with torch.no_grad():
            if self.soft:
                for mod, part in zip(self.soft, self.v.detach().split(self.sizes)):
                    mod.v.copy_(part.view_as(mod.v))
                    mod.override = None
            for p in self.scales:
                p.grad = None
        if self.v is not None:
            self.v.grad = None


__all__ = ["CHECK_EVERY", "GAMMA", "UnitStep", "WARMUP_STEPS", "ZETA", "lsq_quantize", "recon_loss",
           "schedule_tables", "soft_round"]
