"""Training methods as small strategy objects sharing one trainer.

A method decides what happens in one optimization step (between ``zero_grad`` and
``optimizer.step``), at the start of an epoch and at the end of training
(:meth:`Method.on_train_end`: the model is clean and free of hooks afterwards); the trainer owns
everything else, including the BatchNorm rule that treats every method alike
(:mod:`dnq.batchnorm`).

* ``sgd``: plain forward/backward (the baseline).
* ``dnq``: differential weight noise + salience-masked activation noise (:mod:`dnq.noise`).
* ``dnq-w`` / ``dnq-a``: weight noise only / activation noise only.
* ``gaussian``: the plain-noise baseline: fresh zero-mean Gaussian weight noise with the same
  per-channel variance as DNQ's measured weight error, drawn every step, applied for the
  gradient and removed before the update (differential, like DNQ), no mean, no activation noise.
  What DNQ adds on top of it is the error's mean, its structure, and the activation noise.
* ``gaussian-iso``: the same with one variance per layer (the mean of its channels' variances).
* ``gaussian-walk``: ablation that diverges: DNQ's weight noise (mean and variance) added to the
  weights for good at every step, so it accumulates into a random walk that feeds back into the
  next epoch's statistics (on digits it collapses as the learning rate decays). Kept only to show
  why the noise must be removed before the update; not a baseline.
* ``sam``: Sharpness-Aware Minimization (Foret et al., ICLR 2021): the gradient is taken at
  ``W + rho * g / ||g||`` and applied to ``W``. The second pass does not update BatchNorm
  running statistics.

Example:
    One step of ``dnq`` as the trainer takes it: the gradient is taken at noisy weights, the
    weights stay clean.

    >>> import contextlib, torch, torch.nn.functional as F
    >>> from dnq.methods import make_method
    >>> from dnq.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> model, x, y = build_model("cnn-digits", 10, 1, 8), torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    >>> w, (clean_grad,) = model[0].weight.clone(), torch.autograd.grad(F.cross_entropy(model(x), y), model[0].weight)
    >>> dnq = make_method("dnq", wbits=4, abits=4)
    >>> dnq.setup(model, calib_x=x, device=torch.device("cpu"), seed=0, rank=0)
    >>> dnq.on_epoch_start(epoch=0, lam=1.0)  # measures the 4-bit quantization error on calib_x
    >>> loss, logits = dnq.step(model, x, y, F.cross_entropy, autocast=contextlib.nullcontext)
    >>> torch.equal(model[0].weight, w), torch.allclose(model[0].weight.grad, clean_grad)
    (True, False)
    >>> dnq.on_train_end()  # the model is clean and free of hooks again
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .noise import QuantNoise, perturbed

METHODS = ("sgd", "dnq", "dnq-w", "dnq-a", "gaussian", "gaussian-iso", "gaussian-walk", "sam")
NOISE_METHODS = ("dnq", "dnq-w", "dnq-a", "gaussian", "gaussian-iso", "gaussian-walk")


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss (float32 / float64 pass through)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion,
                     autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward pass; returns the detached loss and logits."""
    with autocast():
        out = model(x)
        loss = criterion(upcast(out), y)
    loss.backward()
    return loss.detach(), out.detach()


class Method:
    """The baseline (``sgd``): one forward/backward per step."""

    name = "sgd"
    uses_noise = False

    def setup(self, model: nn.Module, calib_x: torch.Tensor, device: torch.device, seed: int, rank: int) -> None:
        """Called once by the trainer with the unwrapped model and the calibration inputs."""
        self.model, self.calib_x, self.device, self.seed, self.rank = model, calib_x, device, seed, rank

    def on_epoch_start(self, epoch: int, lam: float) -> None:
        self.lam = lam

    def step(self, model: nn.Module, x, y, criterion, autocast):
        """``model`` may be the DDP / compiled wrapper of :attr:`model`."""
        return forward_backward(model, x, y, criterion, autocast)

    def epoch_metrics(self) -> dict:
        return {}

    # -- the capturable step (dnq.step_graph) ----------------------------------------------------
    def prepare_step(self) -> None:
        """Called before every static or replayed step, eagerly: bring every device tensor the
        step reads (noise strength, noise statistics) up to date, in place."""

    def graph_key(self) -> tuple:
        """The Python-side state a captured step depends on (which branches the step takes); a
        change means the step must be captured again."""
        return ()

    def generators(self) -> list[torch.Generator]:
        """The device generators the step draws from (registered with a CUDA graph: a replay
        advances them as an eager step would)."""
        return []

    def capture_unavailable(self) -> str | None:
        """Why this method's step cannot be captured, or None."""
        return None

    def on_train_end(self) -> None:
        """Called once after the last epoch: leave :attr:`model` clean (no noise, no hooks)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoiseMethod(Method):
    """DNQ and its ablations: statistics refreshed each epoch, noise drawn per step."""

    uses_noise = True

    def __init__(self, name: str, wbits: int, abits: int, weight: bool, act: bool, differential: bool = True,
                 ema_beta: float = 0.9, temperature: float = 1.0, rho: float = 0.5, first_last_bits: int | None = None,
                 sampler: str = "auto", weight_form: str = "error"):
        self.name, self.wbits, self.abits = name, wbits, abits
        self.weight, self.act, self.differential = weight, act, differential
        self.kw = dict(beta=ema_beta, temperature=temperature, rho=rho, first_last_bits=first_last_bits,
                       sampler=sampler, weight_form=weight_form)

    def setup(self, model, calib_x, device, seed, rank):
        super().setup(model, calib_x, device, seed, rank)
        self.noise = QuantNoise(model, self.wbits, self.abits, weight=self.weight, act=self.act, **self.kw).attach()

    def _generators(self, epoch: int):
        # Weight noise: one stream shared by all ranks (the model is one model). Activation noise:
        # a stream per rank (each rank sees different samples). Both depend only on (seed, epoch).
        # the generators are made once and reseeded (a CUDA graph keeps the generators it was captured with)
        base = 2_147_483_647 * (self.seed + 1) + 104_729 * epoch
        if getattr(self, "w_gen", None) is None:
            self.w_gen = torch.Generator(device=self.device)
        self.w_gen.manual_seed(base + 1)
        self.noise.new_epoch(base + 3 + 2 * self.rank)

    def on_epoch_start(self, epoch, lam):
        super().on_epoch_start(epoch, lam)
        self.noise.update(self.calib_x)
        self._generators(epoch)
        self.noise.act_lambda = lam if self.act else 0.0

    def step(self, model, x, y, criterion, autocast):
        if self.act:
            self.noise.begin_step(x, autocast)  # the step's activation noise, drawn before the forward
        if not self.weight:
            return forward_backward(model, x, y, criterion, autocast)
        if self.differential:
            with self.noise.perturbed_weights(self.lam, self.w_gen):
                return forward_backward(model, x, y, criterion, autocast)
        self.noise.add_weight_noise_(self.lam, self.w_gen)
        return forward_backward(model, x, y, criterion, autocast)

    def epoch_metrics(self):
        return {"noise": self.noise.summary()}

    def prepare_step(self):
        if self.weight and self.lam != 0:
            self.noise.prepare_weight_noise(self.lam)
        if self.act:
            self.noise.prepare_act_noise()

    def graph_key(self):
        return (self.lam != 0, self.noise.act_noise_key())

    def generators(self):
        gens = [self.w_gen] if self.weight and getattr(self, "w_gen", None) is not None else []
        if self.act and self.noise.act_generator is not None:
            gens.append(self.noise.act_generator)
        return gens

    def capture_unavailable(self):
        if self.act and self.noise._sampler(self.device) == "table":
            return ("--act-sampler table takes each step's slice offsets on the host; use --act-sampler fresh (the "
                    "CUDA default) to capture the step")
        return None

    def on_train_end(self):
        self.noise.act_lambda = 0.0
        self.noise.detach()

    def state_dict(self):
        return {"noise": self.noise.state_dict()}

    def load_state_dict(self, state):
        self.noise.load_state_dict(state["noise"])


class _BNStats:
    """Saves every BatchNorm buffer (running mean/var, batch count) into preallocated copies and
    restores them, with one ``_foreach_copy_`` each way."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                        for b in m.buffers()]
        self.saved = [b.clone() for b in self.buffers]

    @contextlib.contextmanager
    def frozen(self):
        """Within the block the statistics may change; on exit they are what they were."""
        if not self.buffers:
            yield
            return
        with torch.no_grad():
            torch._foreach_copy_(self.saved, self.buffers)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)


class SAM(Method):
    """Sharpness-Aware Minimization with radius ``rho`` (Foret et al. 2021, Algorithm 1)."""

    name = "sam"

    def __init__(self, rho: float = 0.05):
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.rho = rho

    def setup(self, model, calib_x, device, seed, rank):
        super().setup(model, calib_x, device, seed, rank)
        self._bn = _BNStats(model)
        self._clean: list[torch.Tensor] | None = None

    def step(self, model, x, y, criterion, autocast):
        loss, out = forward_backward(model, x, y, criterion, autocast)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        # ||g|| from per-tensor norms (one fused kernel; half-precision gradients accumulate in
        # float32), on the device: no host sync
        acc = torch.promote_types(grads[0].dtype, torch.float32)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, dtype=acc)))
        scale = self.rho / (norm + 1e-12)
        with torch.no_grad():
            e = torch._foreach_mul(grads, scale.to(grads[0].dtype))
        for p in params:
            p.grad = None
        if self._clean is None or [c.shape for c in self._clean] != [p.shape for p in params]:
            self._clean = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        with perturbed(params, e, 1.0, self._clean), self._bn.frozen():
            forward_backward(model, x, y, criterion, autocast)
        return loss, out

    def epoch_metrics(self):
        return {"sam_rho": self.rho}


def make_method(name: str, wbits: int = 4, abits: int = 4, sam_rho: float = 0.05, ema_beta: float = 0.9,
                temperature: float = 1.0, act_rho: float = 0.5, noise_first_last_bits: int | None = None,
                act_sampler: str = "auto") -> Method:
    """Build a method by name (see :data:`METHODS`)."""
    kw = dict(ema_beta=ema_beta, temperature=temperature, rho=act_rho, first_last_bits=noise_first_last_bits,
              sampler=act_sampler)
    if name == "sgd":
        return Method()
    if name == "dnq":
        return NoiseMethod(name, wbits, abits, weight=True, act=True, **kw)
    if name == "dnq-w":
        return NoiseMethod(name, wbits, abits, weight=True, act=False, **kw)
    if name == "dnq-a":
        return NoiseMethod(name, wbits, abits, weight=False, act=True, **kw)
    if name == "gaussian":
        return NoiseMethod(name, wbits, abits, weight=True, act=False, weight_form="centered", **kw)
    if name == "gaussian-iso":
        return NoiseMethod(name, wbits, abits, weight=True, act=False, weight_form="isotropic", **kw)
    if name == "gaussian-walk":
        return NoiseMethod(name, wbits, abits, weight=True, act=False, differential=False, **kw)
    if name == "sam":
        return SAM(sam_rho)
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
