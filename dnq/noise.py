"""Quantization-error noise for DNQ (Differential Noise-driven Quantization).

DNQ measures, at the start of every epoch, the error that round-to-nearest quantization at
the target bit-width would make, models it as Gaussian noise, and injects that noise during
training so that the full-precision model settles in a minimum that is flat along the
directions quantization will push it:

* **Weight-error statistics**: for every Conv/Linear weight ``W``, the error ``E = Q(W) - W`` of
  a symmetric max-abs quantizer per output channel gives a mean and variance per channel.
* **Activation-error statistics**: at the input of every Conv/Linear, an asymmetric per-tensor
  min-max quantizer calibrated on a fixed calibration subset gives a scalar mean and variance.
* Both are smoothed across epochs with an EMA (``beta = 0.9``).
* **Differential weight noise** (:meth:`QuantNoise.perturbed_weights`): each step draws
  ``delta ~ N(mu, sigma^2)`` per element, takes the gradient at ``W + lambda * delta`` and restores
  the clean ``W`` exactly (by copy, not subtraction) before the optimizer step, so the noise
  never accumulates and the saved weights are always the clean ones.
* **Salience-masked activation noise** (forward pre-hooks): channel salience ``I_c = mean |x|``
  over spatial positions (tokens for ViTs), ``S = softmax(I / T)``, injection probability
  ``p = clip(S * C * rho, 0, 1)``, a Bernoulli(p) mask per element, ``x' = x + lambda * M * delta_a``.

No model code is edited: weights are perturbed in place around the forward/backward pass and
restored from a saved copy (which works unchanged under DDP, ``torch.compile`` and autocast),
and activations are perturbed by hooks that are no-ops outside training or at ``lambda = 0``.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.noise import QuantNoise
    >>> model = build_model("cnn-digits", 10, 1, 8)
    >>> noise = QuantNoise(model, wbits=4, abits=4)
    >>> noise.update(torch.randn(32, 1, 8, 8))
    >>> g = torch.Generator().manual_seed(0)
    >>> with noise.perturbed_weights(1.0, g):
    ...     loss = model(torch.randn(8, 1, 8, 8)).sum()
    ...     loss.backward()          # gradient at W + delta; W is clean again afterwards
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .quant import act_qparams, check_bits, fake_quantize, quant_layers, quantize_weight


SAMPLERS = ("auto", "fresh", "table")


@contextlib.contextmanager
def perturbed(params: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float = 1.0,
              clean: list[torch.Tensor] | None = None):
    """Within the block ``params`` hold ``params + alpha * deltas``; on exit (also on error) they
    are restored bit for bit from a saved copy (``clean``: preallocated buffers to save into), not
    by subtraction, which would leave rounding residue. Run forward *and* backward inside."""
    with torch.no_grad():
        if clean is None:
            clean = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(clean, params)
        torch._foreach_add_(params, deltas, alpha=alpha)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, clean)


@dataclass
class LambdaSchedule:
    """Noise strength per epoch: 0 before ``start_epoch``, then a linear ramp that reaches
    ``lambda_max`` after ``warmup_epochs`` epochs (at once if ``warmup_epochs`` is 0).

    ``lambda(e) = lambda_max * min(1, (e - start + 1) / warmup)`` for ``e >= start``.
    """

    lambda_max: float = 1.0
    start_epoch: int = 0
    warmup_epochs: int = 0

    def __post_init__(self):
        if self.lambda_max < 0:
            raise ValueError(f"lambda_max must be >= 0, got {self.lambda_max}")
        if self.start_epoch < 0 or self.warmup_epochs < 0:
            raise ValueError("lambda start and warm-up epochs must be >= 0")

    def __call__(self, epoch: int) -> float:
        if epoch < self.start_epoch:
            return 0.0
        if self.warmup_epochs == 0:
            return float(self.lambda_max)
        return float(self.lambda_max) * min(1.0, (epoch - self.start_epoch + 1) / self.warmup_epochs)


def weight_error_stats(model: nn.Module, bits: int, bits_override: dict[str, int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-channel mean and variance of ``Q(W) - W`` for every Conv/Linear weight.

    ``Q`` is the symmetric max-abs per-channel quantizer at ``bits`` (or ``bits_override[name]``).
    Returns ``{layer name: (mean (C,), variance (C,))}``, variances over the channel's elements
    (population variance).
    """
    out = {}
    with torch.no_grad():
        for name, layer in quant_layers(model):
            w = layer.weight.detach().float()
            b = (bits_override or {}).get(name, bits)
            err = (quantize_weight(w, b, "symmetric", "minmax") - w).reshape(w.shape[0], -1)
            out[name] = (err.mean(dim=1), err.var(dim=1, unbiased=False))
    return out


@torch.no_grad()
def activation_error_stats(model: nn.Module, bits: int, calib_x: torch.Tensor, batch_size: int = 256,
                           bits_override: dict[str, int] | None = None) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Scalar mean and variance of ``Q(x) - x`` at the input of every Conv/Linear layer.

    ``Q`` is an asymmetric per-tensor min-max quantizer whose range is calibrated on
    ``calib_x``; the error statistics are taken over the same data. The model runs in eval mode
    (BatchNorm running statistics) and is returned to its previous mode.

    Returns:
        ``({layer name: (mean, variance)}, layer names in execution order)``.
    """
    layers = dict(quant_layers(model))
    lo = {n: float("inf") for n in layers}
    hi = {n: float("-inf") for n in layers}
    acc: dict[str, list[float]] = {n: [0.0, 0.0, 0] for n in layers}
    order: list[str] = []
    phase = "range"

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach().float()
            if phase == "range":
                if name not in order:
                    order.append(name)
                lo[name] = min(lo[name], float(x.min()))
                hi[name] = max(hi[name], float(x.max()))
            else:
                b = (bits_override or {}).get(name, bits)
                s, z, qmin, qmax = act_qparams(lo[name], hi[name], b)
                e = fake_quantize(x, torch.tensor(s, device=x.device), torch.tensor(z, device=x.device), qmin, qmax) - x
                acc[name][0] += float(e.sum(dtype=torch.float64))
                acc[name][1] += float(e.double().pow(2).sum())
                acc[name][2] += e.numel()
        return hook

    was_training = model.training
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        for phase in ("range", "error"):  # the hooks read ``phase`` from this scope
            for x in calib_x.split(batch_size):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = {}
    for n in order:
        s, s2, cnt = acc[n]
        mean = s / cnt
        stats[n] = (mean, max(s2 / cnt - mean * mean, 0.0))
    return stats, order


def channel_salience_probs(x: torch.Tensor, channel_dim: int, temperature: float = 1.0, rho: float = 0.5,
                           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample, per-channel injection probabilities ``clip(softmax(I / T) * C * rho, 0, 1)``.

    ``I_c = mean |x|`` over every dimension but the batch (0) and ``channel_dim``. The result is
    shaped to broadcast against ``x`` (size 1 in the averaged dimensions). ``scratch`` (float32,
    shaped like ``x``) saves an allocation.
    """
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("the channel dimension cannot be the batch dimension")
    reduce = [d for d in range(1, x.dim()) if d != cd]
    sal = torch.abs(x.detach(), out=scratch) if scratch is not None else x.detach().abs().float()
    if reduce:
        sal = sal.mean(dim=reduce, keepdim=True)
    c = x.shape[cd]
    return (torch.softmax(sal / temperature, dim=cd) * (c * rho)).clamp_(0.0, 1.0)


class QuantNoise:
    """Quantization-error statistics of a model and the DNQ noise drawn from them.

    Args:
        model: the (unwrapped) model; its Conv/Linear layers are the noise sites.
        wbits, abits: target weight and activation bits (2..8).
        weight, act: enable the weight-error and activation-error parts.
        beta: EMA factor across epochs (new = beta * old + (1 - beta) * measured; the first
            measurement is taken as is).
        temperature, rho: salience softmax temperature ``T`` and injection rate ``rho``.
        first_last_bits: if set, the first and last layers use these bits for their statistics
            (to match a PTQ that keeps them at 8 bits); default: every layer at the target bits.
        sampler: where the activation noise's uniform and normal numbers come from. ``"fresh"``
            draws them for every call. ``"table"`` draws two tables per epoch (twice the largest
            activation) and takes each call's numbers from a slice at a random offset: every
            draw has exactly the stated distribution, element-wise independent within a call,
            but draws of different steps can overlap in the table (as in the shared noise table
            of Salimans et al. 2017). On the CPU random-number generation costs several times a
            convolution, so ``"auto"`` (default) uses ``"table"`` on the CPU, ``"fresh"`` on CUDA.
    """

    def __init__(self, model: nn.Module, wbits: int, abits: int, weight: bool = True, act: bool = True,
                 beta: float = 0.9, temperature: float = 1.0, rho: float = 0.5, first_last_bits: int | None = None,
                 sampler: str = "auto"):
        check_bits(wbits, "weight bits")
        check_bits(abits, "activation bits")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        if temperature <= 0 or rho < 0:
            raise ValueError(f"need temperature > 0 and rho >= 0, got T={temperature}, rho={rho}")
        if first_last_bits is not None:
            check_bits(first_last_bits, "first/last layer bits")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown activation-noise sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.model, self.wbits, self.abits = model, wbits, abits
        self.weight, self.act, self.beta = weight, act, beta
        self.temperature, self.rho, self.first_last_bits = temperature, rho, first_last_bits
        self.layers = quant_layers(model)
        self.params = [m.weight for _, m in self.layers]
        self.w_mean: dict[str, torch.Tensor] = {}
        self.w_var: dict[str, torch.Tensor] = {}
        self.a_mean: dict[str, float] = {}
        self.a_var: dict[str, float] = {}
        self.order: list[str] = []
        self.updates = 0
        self.act_lambda = 0.0
        self.act_generator: torch.Generator | None = None
        self._host_rng = random.Random(0)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ws: torch.Tensor | None = None
        self._hooks: list = []
        self._clean: list[torch.Tensor] | None = None

    # -- statistics -------------------------------------------------------------------------
    def _override(self) -> dict[str, int]:
        if self.first_last_bits is None or not self.order:
            return {}
        return {self.order[0]: self.first_last_bits, self.order[-1]: self.first_last_bits}

    def update(self, calib_x: torch.Tensor, batch_size: int = 256) -> None:
        """Measure the current quantization errors on ``calib_x`` and fold them into the EMA.

        Under ``torch.distributed`` the result of rank 0 is broadcast, so every rank holds
        identical statistics.
        """
        need_order = not self.order
        a_stats: dict = {}
        if self.act or need_order:
            a_stats, self.order = activation_error_stats(self.model, self.abits, calib_x, batch_size,
                                                         self._override())
            if need_order and self.act and self.first_last_bits is not None:  # now the order is known
                a_stats, _ = activation_error_stats(self.model, self.abits, calib_x, batch_size,
                                                    self._override())
        w_stats = weight_error_stats(self.model, self.wbits, self._override()) if self.weight else {}
        first = self.updates == 0
        b = self.beta
        for n, (m, v) in w_stats.items():
            self.w_mean[n] = m if first else b * self.w_mean[n] + (1 - b) * m
            self.w_var[n] = v if first else b * self.w_var[n] + (1 - b) * v
        if self.act:
            for n, (m, v) in a_stats.items():
                self.a_mean[n] = m if first else b * self.a_mean[n] + (1 - b) * m
                self.a_var[n] = v if first else b * self.a_var[n] + (1 - b) * v
        self.updates += 1
        self._broadcast()

    def _flat(self) -> torch.Tensor:
        dev = self.params[0].device
        parts = [torch.cat([self.w_mean[n], self.w_var[n]]).float() for n, _ in self.layers if n in self.w_mean]
        acts = [v for n in self.order if n in self.a_mean for v in (self.a_mean[n], self.a_var[n])]
        parts.append(torch.tensor(acts, dtype=torch.float32, device=dev))
        return torch.cat([p.to(dev) for p in parts])

    def _unflat(self, flat: torch.Tensor) -> None:
        i = 0
        for n, _ in self.layers:
            if n in self.w_mean:
                c = self.w_mean[n].numel()
                self.w_mean[n], self.w_var[n] = flat[i:i + c].clone(), flat[i + c:i + 2 * c].clone()
                i += 2 * c
        for n in self.order:
            if n in self.a_mean:
                self.a_mean[n], self.a_var[n] = float(flat[i]), float(flat[i + 1])
                i += 2

    def _broadcast(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = self._flat()
            dist.broadcast(flat, src=0)
            self._unflat(flat)

    def state_dict(self) -> dict:
        """Tensors and numbers only (loadable with ``torch.load(..., weights_only=True)``)."""
        return {"updates": self.updates, "order": list(self.order),
                "w_mean": dict(self.w_mean), "w_var": dict(self.w_var),
                "a_mean": dict(self.a_mean), "a_var": dict(self.a_var)}

    def load_state_dict(self, state: dict) -> None:
        dev = self.params[0].device
        self.updates, self.order = int(state["updates"]), list(state["order"])
        self.w_mean = {k: v.to(dev) for k, v in state["w_mean"].items()}
        self.w_var = {k: v.to(dev) for k, v in state["w_var"].items()}
        self.a_mean, self.a_var = dict(state["a_mean"]), dict(state["a_var"])

    def summary(self) -> dict:
        """Per-layer noise statistics for the metrics log: weight error mean and std (averaged
        over channels) and activation error mean and std."""
        out: dict = {}
        if self.w_mean:
            out["weight"] = {n: {"mu": float(self.w_mean[n].mean()), "sigma": float(self.w_var[n].mean().sqrt())}
                             for n, _ in self.layers if n in self.w_mean}
        if self.a_mean:
            out["act"] = {n: {"mu": self.a_mean[n], "sigma": self.a_var[n] ** 0.5} for n in self.order if n in self.a_mean}
        return out

    # -- weight noise ------------------------------------------------------------------------
    def sample_weight_noise(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One draw ``delta ~ N(mu_c, sigma_c^2)`` per weight element, for every Conv/Linear weight
        (in :attr:`params` order). One random call for all layers."""
        if not self.w_mean:
            raise RuntimeError("no weight-error statistics yet; call update() first")
        dev, dtype = self.params[0].device, self.params[0].dtype
        z = torch.randn(sum(p.numel() for p in self.params), device=dev, dtype=dtype, generator=generator)
        out, i = [], 0
        for (n, _), p in zip(self.layers, self.params):
            zi = z[i:i + p.numel()].view_as(p)
            i += p.numel()
            shape = (-1,) + (1,) * (p.dim() - 1)
            out.append(zi.mul_(self.w_var[n].sqrt().to(dtype).view(shape)).add_(self.w_mean[n].to(dtype).view(shape)))
        return out

    @contextlib.contextmanager
    def perturbed_weights(self, lam: float, generator: torch.Generator | None = None):
        """Within the block the Conv/Linear weights are ``W + lam * delta`` (a fresh draw); on exit
        they are restored bit for bit from a saved copy. Run forward *and* backward inside."""
        if lam == 0 or not self.weight:
            yield
            return
        if self._clean is None or self._clean[0].device != self.params[0].device:
            self._clean = [torch.empty_like(p) for p in self.params]
        with perturbed(self.params, self.sample_weight_noise(generator), lam, self._clean):
            yield

    @torch.no_grad()
    def add_weight_noise_(self, lam: float, generator: torch.Generator | None = None) -> None:
        """Add ``lam * delta`` to the weights for good (the non-differential ``gaussian`` ablation)."""
        if lam != 0:
            torch._foreach_add_(self.params, self.sample_weight_noise(generator), alpha=lam)

    # -- activation noise ---------------------------------------------------------------------
    def attach(self) -> "QuantNoise":
        """Register the activation-noise pre-hooks (idempotent). They act only while the model
        is training, :attr:`act_lambda` > 0 and statistics exist."""
        if self._hooks or not self.act:
            return self
        for name, layer in self.layers:
            cdim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1
            self._hooks.append(layer.register_forward_pre_hook(self._make_act_hook(name, cdim)))
        return self

    def detach(self) -> None:
        """Remove the activation-noise hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def new_epoch(self, seed: int) -> None:
        """Reseed the activation-noise streams (called at every epoch start by the trainer, with
        a seed that depends on run seed, epoch and rank); the noise table is drawn anew."""
        dev = self.params[0].device
        self.act_generator = torch.Generator(device=dev).manual_seed(seed)
        self._host_rng = random.Random(seed)
        self._table = None

    def _uniform_normal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U(0,1)`` and ``N(0,1)`` tensors shaped like ``x`` (fresh, or slices of the epoch's table)."""
        g, n = self.act_generator, x.numel()
        sampler = self.sampler
        if sampler == "auto":
            sampler = "fresh" if x.device.type == "cuda" else "table"
        if sampler == "fresh":
            return (torch.rand(x.shape, device=x.device, generator=g),
                    torch.randn(x.shape, device=x.device, generator=g))
        if self._table is None or self._table[0].numel() < n:
            size = 2 * n if self._table is None else max(2 * n, self._table[0].numel())
            self._table = (torch.rand(size, device=x.device, generator=g), torch.randn(size, device=x.device, generator=g))
        o = self._host_rng.randrange(0, self._table[0].numel() - n + 1)
        return self._table[0][o:o + n].view(x.shape), self._table[1][o:o + n].view(x.shape)

    def _workspace(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 scratch tensor shaped like ``x``, reused across layers and steps: fresh
        multi-MB allocations cost page faults that made each elementwise op several times slower
        on the CPU. Safe to reuse: the noise's autograd nodes do not keep it for backward."""
        n = x.numel()
        if self._ws is None or self._ws.numel() < n or self._ws.device != x.device:
            self._ws = torch.empty(n, device=x.device)
        return self._ws[:n].view(x.shape)

    def _make_act_hook(self, name: str, cdim: int):
        def hook(mod, args):
            lam = self.act_lambda
            if not mod.training or lam == 0 or name not in self.a_mean:
                return None
            x = args[0]
            if x.dim() < 2:
                return None
            with torch.no_grad():
                mask = self._workspace(x)
                p = channel_salience_probs(x, cdim, self.temperature, self.rho, scratch=mask)
                u, z = self._uniform_normal(x)
                # float ops only (boolean tensors are slow on the CPU): ceil(p - u) is 1 with
                # probability p and 0 otherwise, as u ~ U[0, 1) and p - u lies in (-1, 1]
                torch.sub(p, u, out=mask).ceil_()
            # x + lam * M * (mu + sigma * z), in two passes over x
            out = torch.addcmul(x, mask, z, value=lam * self.a_var[name] ** 0.5)
            mu = lam * self.a_mean[name]
            return (out.add_(mask, alpha=mu) if mu else out, *args[1:])
        return hook
