"""Quantization-error noise for DNQ (Differential Noise-driven Quantization).

DNQ measures, at the start of every epoch, the error that round-to-nearest quantization at
the target bit-width would make, models it as Gaussian noise, and injects that noise during
training so that the full-precision model settles in a minimum that is flat along the
directions quantization will push it:

* **Weight-error statistics**: for every Conv/Linear weight ``W``, the error ``E = Q(W) - W`` of
  a symmetric max-abs quantizer per output channel gives a mean and variance per channel.
* **Activation-error statistics**: at the input of every Conv/Linear, an asymmetric per-tensor
  min-max quantizer calibrated on a fixed calibration subset gives a scalar mean and variance.
* Both are smoothed across epochs with an EMA (``beta = 0.9``), and always measured in float32
  with TF32 and autocast off, whatever the training precision.
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

GPU and compiler friendliness: every step's random numbers are drawn *before* the forward pass
(:meth:`QuantNoise.begin_step`): the weight noise is one draw and one fused ``addcmul`` into a
flat buffer laid out like the weights (channels_last included), applied with one ``_foreach``
add; the activation noise is one uniform and one normal draw per dtype into flat buffers that the
hooks slice at fixed offsets, in the activations' own dtype (bf16 under autocast) and memory
format. The hooks hold no Python-side random draws, host reads or per-epoch Python numbers, so
``torch.compile`` traces them without graph breaks or recompiles.

Example:
    >>> import torch
    >>> from dnq.models import build_model
    >>> from dnq.noise import QuantNoise
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("cnn-digits", 10, 1, 8)
    >>> noise = QuantNoise(model, wbits=4, abits=4)
    >>> noise.update(torch.randn(32, 1, 8, 8))  # the error statistics, on calibration inputs
    >>> w, g = model[0].weight.clone(), torch.Generator().manual_seed(0)
    >>> with noise.perturbed_weights(1.0, g):
    ...     noisy = not torch.equal(model[0].weight, w)  # W + delta here
    ...     model(torch.randn(8, 1, 8, 8)).sum().backward()  # the gradient at W + delta
    >>> noisy, torch.equal(model[0].weight, w)  # W is clean again afterwards
    (True, True)
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from dnq_landscape_common.precision import full_precision

from .noise_stats import activation_error_stats, weight_error_stats
from .quant import check_bits, layer_bits, quant_layers

SAMPLERS = ("auto", "fresh", "table")
# How the weight noise is drawn from the measured error statistics (mu_c, sigma_c^2) of a layer:
# "error": N(mu_c, sigma_c^2) per output channel c (DNQ); "centered": N(0, sigma_c^2) (the fair
# Gaussian baseline: the same per-channel variance, no mean); "isotropic": N(0, mean_c sigma_c^2),
# one variance per layer.
WEIGHT_NOISE_FORMS = ("error", "centered", "isotropic")


@contextlib.contextmanager
def perturbed(params: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float = 1.0,
              clean: list[torch.Tensor] | None = None):
    """Within the block ``params`` hold ``params + alpha * deltas``; on exit (also on error) they
    are restored bit for bit from a saved copy (``clean``: preallocated buffers to save into), not
    by subtraction, which would leave rounding residue. Run forward *and* backward inside.

    ``deltas`` laid out like ``params`` (same strides) keep ``_foreach_add_`` on its fused path."""
    with torch.no_grad():
        if clean is None:
            clean = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
        else:
            torch._foreach_copy_(clean, params)
        torch._foreach_add_(params, deltas, alpha=alpha)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, clean)


def _dense_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive segments of ``flat`` viewed with the shapes *and strides* of ``like`` (dense
    tensors in any memory format, e.g. channels_last), so elementwise ops between the two never
    meet mismatched layouts."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[i:i + n].as_strided(t.shape, t.stride()))
        i += n
    return out


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (some permutation of its dims is contiguous)."""
    return _physical_order(t) is not None


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


def channel_salience_probs(x: torch.Tensor, channel_dim: int, temperature: float = 1.0, rho: float = 0.5,
                           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample, per-channel injection probabilities ``clip(softmax(I / T) * C * rho, 0, 1)``.

    ``I_c = mean |x|`` over every dimension but the batch (0) and ``channel_dim``. The float32
    result is shaped to broadcast against ``x`` (size 1 in the averaged dimensions). ``scratch``
    (shaped, typed and laid out like ``x``) saves the allocation of ``|x|`` on the CPU.
    """
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("the channel dimension cannot be the batch dimension")
    return _injection_threshold(x, cd, temperature, rho, scratch).clamp_(0.0, 1.0)


def _physical_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation of ``x``'s dims that makes it contiguous (identity for a contiguous tensor,
    NHWC order for channels_last), or None if ``x`` is not dense. Elementwise kernels run much
    faster on the permuted views when broadcasting and mixed dtypes meet a channels_last layout
    (a bf16 ``lt`` against a (B, C, 1, 1) tensor is much faster permuted: BENCHMARKS.md, "behind the defaults")."""
    perm = tuple(sorted(range(x.dim()), key=lambda d: (x.stride(d), x.shape[d]), reverse=True))
    return perm if x.permute(perm).is_contiguous() else None


class QuantNoise:
    """Quantization-error statistics of a model and the DNQ noise drawn from them.

    Args:
        model: the (unwrapped) model; its Conv/Linear layers are the noise sites.
        wbits, abits: target weight and activation bits (2..8).
        weight, act: enable the weight-error and activation-error parts.
        beta: EMA factor across epochs (new = beta * old + (1 - beta) * measured; the first
            measurement is taken as is).
        temperature, rho: salience softmax temperature ``T`` and injection rate ``rho``.
        first_last_bits: if set, the first and last layers (execution order,
            :func:`dnq.quant.layer_bits`) use these bits for their statistics, to match a PTQ that
            keeps them at these bits (the trainer passes 8, as ``dnq ptq`` does); ``None``:
            every layer at the target bits.
        sampler: where the activation noise's uniform and normal numbers come from. ``"fresh"``
            draws them for every step (one draw per dtype into a flat buffer). ``"table"`` draws,
            once per epoch, a normal table per layer (twice the layer's input, already scaled by
            the layer's statistics) and one shared uniform table, and takes each step's numbers
            from slices at random offsets: every draw has exactly the stated distribution,
            element-wise independent within a call, but draws of different steps can overlap in
            the table (as in the shared noise table of Salimans et al. 2017). On the CPU
            random-number generation costs several times a convolution, so ``"auto"`` (default)
            uses ``"table"`` on the CPU, ``"fresh"`` on CUDA.
        weight_form: how the weight noise follows the measured error (see
            :data:`WEIGHT_NOISE_FORMS`): ``"error"`` (DNQ: per-channel mean and variance),
            ``"centered"`` (zero mean, the same per-channel variance) or ``"isotropic"`` (zero
            mean, the layer's average channel variance for every element).

    Per step, call :meth:`begin_step` with the batch before the forward pass (the trainer's
    methods do): it plans the noise sites for the batch's shape, dtype and layout once, and draws
    the step's numbers. Without it (a forward pass outside the trainer), the hooks draw their
    numbers themselves, eagerly.
    """

    def __init__(self, model: nn.Module, wbits: int, abits: int, weight: bool = True, act: bool = True,
                 beta: float = 0.9, temperature: float = 1.0, rho: float = 0.5, first_last_bits: int | None = None,
                 sampler: str = "auto", weight_form: str = "error"):
        check_bits(wbits, "weight bits")
        if weight_form not in WEIGHT_NOISE_FORMS:
            raise ValueError(f"unknown weight noise form {weight_form!r}; valid: {', '.join(WEIGHT_NOISE_FORMS)}")
        self.weight_form = weight_form
        check_bits(abits, "activation bits")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        if not (temperature > 0 and rho >= 0) or temperature == float("inf") or rho == float("inf"):
            raise ValueError(f"need a finite temperature > 0 and a finite rho >= 0, got T={temperature}, rho={rho}")
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
        self._lam = 0.0
        self._on = False
        self._sites: frozenset = frozenset()  # the sites with activation statistics, for the hooks
        self._version = 0  # bumped whenever the statistics or lambda change
        self.act_generator: torch.Generator | None = None
        self._host_rng = random.Random(0)
        self._hooks: list = []
        self._clean: list[torch.Tensor] | None = None
        self._wbuf: dict | None = None  # flat weight-noise buffers
        self._recording: dict | None = None  # set while a planning pass records the noise sites
        self._plans: dict = {}
        self._plan = None
        self._step: dict[str, list] = {}  # this step's (uniform, noise) views per site and call
        self._calls: dict[str, int] = {}
        self._u_table: torch.Tensor | None = None
        self._n_tables: dict = {}
        self._ws: dict = {}
        self._coef_state: dict | None = None  # the activation noise's device coefficients (_coef_tensors)

    # -- statistics -------------------------------------------------------------------------
    @property
    def act_lambda(self) -> float:
        """Strength of the activation noise (the hooks are no-ops at 0)."""
        return self._lam

    @act_lambda.setter
    def act_lambda(self, value: float) -> None:
        if float(value) != self._lam:
            self._lam = float(value)
            self._on = self.act and self._lam != 0  # a bool for the hooks: no per-value recompiles
            self._version += 1
        self._refresh_sites()

    def _refresh_sites(self) -> None:
        """Replace :attr:`_sites` only when the set of sites changes (a new object would make
        torch.compile re-check, or on some versions recompile, the hooks)."""
        if self._sites != self.a_mean.keys():
            self._sites = frozenset(self.a_mean)

    def _override(self) -> dict[str, int]:
        """Bits of the first and last layers (execution order, as :func:`dnq.quant.layer_bits`
        decides them for PTQ): ``first_last_bits`` for both weights and activations."""
        if self.first_last_bits is None or not self.order:
            return {}
        bits = layer_bits(self.order, self.wbits, self.abits, self.first_last_bits)
        return {n: wb for n, (wb, _) in bits.items() if n in (self.order[0], self.order[-1])}

    def update(self, calib_x: torch.Tensor, batch_size: int = 256) -> None:
        """Measure the current quantization errors on ``calib_x`` and fold them into the EMA.

        Measured in float32 with autocast and TF32 off, whatever the caller's settings. Under
        ``torch.distributed`` the result of rank 0 is broadcast, so every rank holds identical
        statistics.
        """
        need_order = not self.order
        a_stats: dict = {}
        if self.act or need_order:
            a_stats, self.order = activation_error_stats(self.model, self.abits, calib_x, batch_size,
                                                         self._override())
            if need_order and self.act and self.first_last_bits is not None:  # now the order is known
                a_stats, _ = activation_error_stats(self.model, self.abits, calib_x, batch_size,
                                                    self._override())
        with full_precision():
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
        self._version += 1
        self._refresh_sites()

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
        rest = flat[i:].tolist()
        j = 0
        for n in self.order:
            if n in self.a_mean:
                self.a_mean[n], self.a_var[n] = rest[j], rest[j + 1]
                j += 2

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
        self._version += 1
        self._refresh_sites()

    def summary(self) -> dict:
        """Per-layer noise statistics for the metrics log: weight error mean and std (averaged
        over channels) and activation error mean and std."""
        out: dict = {}
        if self.w_mean:
            names = [n for n, _ in self.layers if n in self.w_mean]
            vals = torch.stack([torch.stack([self.w_mean[n].mean(), self.w_var[n].mean().sqrt()]) for n in names])
            out["weight"] = {n: {"mu": mu, "sigma": sd} for n, (mu, sd) in zip(names, vals.tolist())}
        if self.a_mean:
            out["act"] = {n: {"mu": self.a_mean[n], "sigma": self.a_var[n] ** 0.5}
                          for n in self.order if n in self.a_mean}
        return out

    # -- weight noise ------------------------------------------------------------------------
    def weight_noise_moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-channel mean and standard deviation of the weight noise ``delta`` of layer
        ``name`` (at ``lambda = 1``), as :attr:`weight_form` derives them from the statistics."""
        mean, var = self.w_mean[name], self.w_var[name]
        if self.weight_form == "error":
            return mean, var.sqrt()
        if self.weight_form == "centered":
            return torch.zeros_like(mean), var.sqrt()
        return torch.zeros_like(mean), var.mean().sqrt().expand_as(var)

    def _weight_buffers(self, lam: float) -> dict:
        """Flat buffers laid out like the weights: per-element ``lam * mu`` and ``lam * sigma``
        (refreshed when the statistics or ``lam`` change) and the noise itself."""
        if not self.w_mean:
            raise RuntimeError("no weight-error statistics yet; call update() first")
        p0 = self.params[0]
        buf = self._wbuf
        if buf is None or buf["noise"].device != p0.device or buf["strides"] != [p.stride() for p in self.params]:
            for p in self.params:
                if not _is_dense(p):
                    raise ValueError("DNQ weight noise needs dense (non-overlapping) weight tensors")
            total = sum(p.numel() for p in self.params)
            buf = {"strides": [p.stride() for p in self.params], "key": None}
            for k in ("noise", "mu", "sd"):
                buf[k] = torch.empty(total, device=p0.device, dtype=p0.dtype)
                buf[k + "_views"] = _dense_views(buf[k], self.params)
            self._wbuf = buf
        if buf["key"] != (self._version, lam):
            with torch.no_grad():
                for (n, _), p, mu, sd in zip(self.layers, self.params, buf["mu_views"], buf["sd_views"]):
                    shape = (-1,) + (1,) * (p.dim() - 1)
                    m, s = self.weight_noise_moments(n)
                    mu.copy_((lam * m).view(shape).expand_as(p))
                    sd.copy_((lam * s).reshape(shape).expand_as(p))
            buf["key"] = (self._version, lam)
        return buf

    def _draw_weight_noise(self, lam: float, generator: torch.Generator | None) -> list[torch.Tensor]:
        """``lam * delta`` for every weight, as views of one flat buffer (overwritten by the next
        draw): one normal draw and one fused multiply-add."""
        buf = self._weight_buffers(lam)
        z = buf["noise"]
        with torch.no_grad():
            z.normal_(generator=generator)
            torch.addcmul(buf["mu"], buf["sd"], z, out=z)
        return buf["noise_views"]

    def sample_weight_noise(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One draw ``delta ~ N(mu_c, sigma_c^2)`` per weight element, for every Conv/Linear weight
        (in :attr:`params` order, laid out like each weight). One random call for all layers."""
        return [v.clone(memory_format=torch.preserve_format) for v in self._draw_weight_noise(1.0, generator)]

    @contextlib.contextmanager
    def perturbed_weights(self, lam: float, generator: torch.Generator | None = None):
        """Within the block the Conv/Linear weights are ``W + lam * delta`` (a fresh draw); on exit
        they are restored bit for bit from a saved copy. Run forward *and* backward inside."""
        if lam == 0 or not self.weight:
            yield
            return
        if self._clean is None or self._clean[0].device != self.params[0].device \
                or any(c.stride() != p.stride() for c, p in zip(self._clean, self.params)):
            self._clean = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]
        with perturbed(self.params, self._draw_weight_noise(lam, generator), 1.0, self._clean):
            yield

    @torch.no_grad()
    def add_weight_noise_(self, lam: float, generator: torch.Generator | None = None) -> None:
        """Add ``lam * delta`` to the weights for good (the accumulating ``gaussian-walk`` ablation)."""
        if lam != 0:
            torch._foreach_add_(self.params, self._draw_weight_noise(lam, generator))

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
        a seed that depends on run seed, epoch and rank); the noise tables are drawn anew."""
        dev = self.params[0].device
        if self.act_generator is None or self.act_generator.device != dev:
            self.act_generator = torch.Generator(device=dev)
        self.act_generator.manual_seed(seed)  # reseeded, not replaced: a CUDA graph keeps its generators
        self._host_rng = random.Random(seed)
        self._version += 1
        self._refresh_sites()

    # -- the capturable step (dnq.step_graph): device tensors refreshed before the step ------------
    def prepare_weight_noise(self, lam: float) -> None:
        """Bring the weight noise's per-element ``lam * mu`` and ``lam * sigma`` buffers up to date
        (in place), so that a captured step, which only reads them, draws the current noise."""
        if self.weight and lam != 0:
            self._weight_buffers(lam)

    def prepare_act_noise(self) -> None:
        """Bring the activation noise's per-site ``(lam * mu, lam * sigma)`` device tensors up to
        date (in place: ``fill_``, no host read)."""
        if self.act and self.act_generator is not None:
            self._coef_tensors(self.params[0].device)

    def act_noise_key(self) -> tuple:
        """The Python-side state of the activation noise a captured step depends on: whether the
        hooks add noise, the sites with statistics, and the sampler."""
        return (self._on, self._sites, bool(self._hooks), self._sampler(self.params[0].device))

    def _coef_tensors(self, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site, 0-dim float32 device tensors ``(lam * mu, lam * sigma)``: one table, refreshed
        in place when the statistics or lambda change (its views stay the same tensors)."""
        c = self._coef_state
        if c is not None and c["version"] == self._version and c["table"].device == torch.device(device):
            return c["views"]  # the hot path: every step of a static or replayed step asks
        names = sorted(self.a_mean)
        if c is None or c["names"] != names or c["table"].device != torch.device(device):
            table = torch.zeros(len(names), 2, device=device)
            c = self._coef_state = {"names": names, "table": table, "version": None,
                              "views": {n: (table[i, 0], table[i, 1]) for i, n in enumerate(names)}}
        if c["version"] != self._version:
            with torch.no_grad():
                for n in names:
                    mu, sd = self._coef(n)
                    c["views"][n][0].fill_(mu)
                    c["views"][n][1].fill_(sd)
            c["version"] = self._version
        return c["views"]

    def _sampler(self, device: torch.device) -> str:
        if self.sampler == "auto":
            return "fresh" if device.type == "cuda" else "table"
        return self.sampler

    def _coef(self, name: str) -> tuple[float, float]:
        """``(lam * mu, lam * sigma)`` of a site."""
        return self._lam * self.a_mean[name], self._lam * self.a_var[name] ** 0.5

    def begin_step(self, x: torch.Tensor, autocast=contextlib.nullcontext) -> None:
        """Draw this step's activation noise for a batch ``x`` (call before the forward pass).

        The noise sites' input shapes, dtypes and layouts for this batch are found once per
        batch shape/dtype/layout and autocast setting, by a no-grad forward pass in eval mode
        (``autocast``: the factory the forward runs under). The numbers then go into flat buffers
        (``"fresh"``) or come from per-epoch tables (``"table"``), and the hooks take fixed views
        of them.
        """
        self._calls = {}
        self._step = {}
        self._refresh_sites()
        if not (self._on and self._sites and self._hooks) or self.act_generator is None:
            return
        dev = x.device.type
        with autocast():
            key = (tuple(x.shape), x.stride(), x.dtype, str(x.device),
                   torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._make_plan(x)
        if self._sampler(x.device) == "fresh":
            self._step = self._draw_fresh(plan)
        else:
            self._step = self._draw_table(plan)

    @torch.no_grad()
    def _make_plan(self, x: torch.Tensor) -> dict:
        """Record every hooked layer's input (shape, stride, dtype) for a batch like ``x``."""
        flags = [(m, m.training) for m in self.model.modules()]
        self._recording = {}
        try:
            self.model.eval()
            self.model(x)
            rec = self._recording
        finally:
            self._recording = None
            for m, f in flags:
                m.training = f
        sites, sizes = {}, {}
        for name, calls in rec.items():
            sites[name] = []
            for shape, stride, dtype, perm in calls:
                n = 1
                for s in shape:
                    n *= s
                phys = shape if perm is None else tuple(shape[d] for d in perm)
                inv = None if perm is None else _inverse(perm)
                sites[name].append(_Site(shape, stride, dtype, n, sizes.get(dtype, 0), perm, inv, phys))
                sizes[dtype] = sizes.get(dtype, 0) + n
        return {"sites": sites, "sizes": sizes, "device": x.device, "buffers": None}

    def _draw_fresh(self, plan: dict) -> dict:
        """One float32 uniform draw for all sites into a flat buffer, and each site's
        ``N(lam * mu, (lam * sigma)^2)`` numbers written straight into its slice of a flat buffer
        of its dtype (bf16 under autocast): one write per number, no separate scaling pass.
        Returns the step's views per site, already shaped in the site's physical order (fixed
        views of the plan's buffers)."""
        if plan["buffers"] is None:
            u = torch.empty(sum(plan["sizes"].values()), device=plan["device"])
            n = {dt: torch.empty(sz, device=plan["device"], dtype=dt) for dt, sz in plan["sizes"].items()}
            views, u_off = {}, 0
            for name, calls in plan["sites"].items():
                views[name] = []
                for site in calls:
                    k, off = site.numel, site.offset
                    views[name].append((u[u_off:u_off + k].view(site.phys), n[site.dtype][off:off + k].view(site.phys),
                                        site))
                    u_off += k
            plan["buffers"] = (u, views)
        u, views = plan["buffers"]
        g = self.act_generator
        coef = self._coef_tensors(plan["device"])
        with torch.no_grad():
            u.uniform_(generator=g)
            for name, slots in views.items():
                if name in self.a_mean:
                    mu, sd = coef[name]  # device tensors: a captured step reads the current values
                    for _, nv, _ in slots:
                        nv.normal_(generator=g)
                        torch.addcmul(mu, sd, nv, out=nv)
        return views

    def _tables(self, name: str, dtype: torch.dtype, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's float32 uniform table (shared by the sites) and the site's scaled normal
        table in ``dtype`` (each at least twice ``n``), drawn when missing, too small, or out of date."""
        g = self.act_generator
        if self._n_tables.get("version") != self._version:
            self._n_tables = {"version": self._version}
            self._u_table = None
        u = self._u_table
        if u is None or u.numel() < 2 * n or u.device != device:
            size = 2 * n if u is None else max(2 * n, u.numel())
            u = self._u_table = torch.empty(size, device=device).uniform_(generator=g)
        t = self._n_tables.get((name, dtype))
        if t is None or t.numel() < 2 * n:
            mu, sd = self._coef(name)
            t = self._n_tables[(name, dtype)] = torch.empty(2 * n, device=device, dtype=dtype).normal_(
                mu, sd, generator=g)
        return u, t

    def _table_views(self, name: str, dtype: torch.dtype, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        ut, nt = self._tables(name, dtype, n, device)
        o1 = self._host_rng.randrange(0, ut.numel() - n + 1)
        o2 = self._host_rng.randrange(0, nt.numel() - n + 1)
        return ut[o1:o1 + n], nt[o2:o2 + n]

    def _draw_table(self, plan: dict) -> dict:
        out = {}
        for name, calls in plan["sites"].items():
            if name in self.a_mean:
                out[name] = []
                for site in calls:
                    u, n = self._table_views(name, site.dtype, site.numel, plan["device"])
                    out[name].append((u.view(site.phys), n.view(site.phys), site))
        return out

    def _sources(self, name: str, x: torch.Tensor):
        """The uniform numbers and the noise ``lam * (mu + sigma * z)`` (``x``'s dtype) for this
        call of a site, shaped like ``x`` in its physical order, and the site's layout (a
        :class:`_Site`): this step's views when :meth:`begin_step` planned them, else drawn here
        (eagerly) for ``x`` as it comes."""
        i = self._calls.get(name, 0)
        self._calls[name] = i + 1
        slots = self._step.get(name)
        if slots is not None and i < len(slots):
            u, n, site = slots[i]
            if site.shape == tuple(x.shape) and site.stride == x.stride() and site.dtype == x.dtype:
                return u, n, site
        # unplanned: a forward pass outside the trainer, or a batch unlike the planned one
        site = _Site.of(x)
        if self._sampler(x.device) == "fresh":
            g = self.act_generator
            mu, sd = self._coef(name)
            u = torch.empty(site.phys, device=x.device).uniform_(generator=g)
            return u, torch.empty(site.phys, device=x.device, dtype=x.dtype).normal_(mu, sd, generator=g), site
        u, n = self._table_views(name, x.dtype, x.numel(), x.device)
        return u.view(site.phys), n.view(site.phys), site

    def _workspace(self, x: torch.Tensor) -> torch.Tensor:
        """A flat scratch tensor of ``x``'s dtype and size, reused across layers and steps: fresh
        multi-MB allocations cost page faults that made each elementwise op several times slower
        on the CPU. Safe to reuse: the noise's autograd nodes do not keep it for backward
        (autograd would raise if they did and it changed)."""
        n = x.numel()
        ws = self._ws.get(x.dtype)
        if ws is None or ws.numel() < n or ws.device != x.device:
            ws = self._ws[x.dtype] = torch.empty(n, device=x.device, dtype=x.dtype)
        return ws[:n]

    def _make_act_hook(self, name: str, cdim: int):
        def hook(mod, args):
            x = args[0]
            if self._recording is not None:  # a planning pass: record the site, add nothing
                site = _Site.of(x)
                self._recording.setdefault(name, []).append((site.shape, site.stride, site.dtype, site.perm))
                return None
            # Python state read here is stable across epochs (bools and a frozenset, not the
            # statistics dicts), so torch.compile's guards hold and nothing recompiles
            if not (mod.training and self._on) or name not in self._sites or x.dim() < 2:
                return None
            u, n, site = self._sources(name, x)
            if site.perm is None:  # not dense (e.g. a token slice h[:, 0]): work on a copy
                x = x.contiguous()
                site = _Site.of(x)
            # the mask is made in x's physical order (NHWC for channels_last: views, no copies),
            # where the broadcast threshold meets the fast kernels; it and the noise are viewed
            # back in x's logical order for the addcmul, so x itself is never permuted (a permute
            # of x would be two autograd nodes per site; BENCHMARKS.md, "behind the defaults")
            ident = site.perm == tuple(range(x.dim()))
            xp = x.detach() if ident else x.detach().permute(site.perm)
            cd = site.inv[cdim % x.dim()]
            compiling = torch.compiler.is_compiling()
            with torch.no_grad():
                ws = None if compiling else self._workspace(x).view(site.phys)
                t = _injection_threshold(xp, cd, self.temperature, self.rho, scratch=ws)
                # the Bernoulli mask in x's dtype: u ~ U[0, 1) falls below min(t, 1) with probability
                # min(t, 1), and u < min(t, 1) iff u < t, so t needs no clipping. u and t in float32:
                # exact probabilities, and the fast kernel on the CPU (a bf16 ``lt`` took 5x longer)
                mask = (u < t).to(x.dtype) if compiling else torch.lt(u, t, out=ws)
                if not ident:
                    mask, n = mask.permute(site.inv), n.permute(site.inv)
            # x + M * lam * (mu + sigma * z), one pass over x (all three in x's layout)
            return (torch.addcmul(x, mask, n), *args[1:])
        return hook


class _Site(NamedTuple):
    """A noise site's input layout. ``perm`` is the order of dims that makes it contiguous (None
    if not dense), ``inv`` its inverse and ``phys`` the shape in that order; ``offset`` places
    the site in the plan's buffers of its dtype."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    numel: int
    offset: int
    perm: tuple | None
    inv: tuple | None
    phys: tuple

    @classmethod
    def of(cls, x: torch.Tensor) -> "_Site":
        perm = _physical_order(x)
        shape = tuple(x.shape)
        if perm is None or perm[0] != 0:  # not dense, or the batch not outermost: handled as a copy
            return cls(shape, x.stride(), x.dtype, x.numel(), 0, None, None, shape)
        return cls(shape, x.stride(), x.dtype, x.numel(), 0, perm, _inverse(perm), tuple(shape[d] for d in perm))


def _injection_threshold(x: torch.Tensor, cd: int, temperature: float, rho: float,
                         scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(I / T) * C * rho`` (float32, unclipped), shaped to broadcast against ``x``, with
    ``I`` the mean of ``|x|`` over every dim but 0 and ``cd``. On CUDA one fused reduction
    (``vector_norm``); on the CPU, where that kernel is several times slower, ``|x|`` into
    ``scratch`` and a sum (accumulated in float32 inside the kernel: asking for a float32 result
    would first copy a bf16 ``x`` to float32)."""
    reduce = [d for d in range(1, x.dim()) if d != cd]
    count = 1
    for d in reduce:
        count *= x.shape[d]
    x = x.detach()
    if not reduce:
        sal = x
    elif x.device.type != "cpu":
        sal = torch.linalg.vector_norm(x, 1, dim=reduce, dtype=torch.float32)
    else:
        sal = (torch.abs(x, out=scratch) if scratch is not None else x.abs()).sum(reduce)
    c = x.shape[cd]
    t = torch.softmax(sal * (1.0 / (count * temperature)), dim=1, dtype=torch.float32) * (c * rho)  # (B, C)
    shape = [1] * x.dim()
    shape[0], shape[cd] = x.shape[0], c
    return t.view(shape)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return tuple(inv)
