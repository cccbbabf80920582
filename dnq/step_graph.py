"""One training step as a static, sync-free function, captured once in a CUDA graph and replayed.

An eager training step of a small network on a fast GPU is bound by Python and kernel launches,
not by arithmetic: on one H200 a resnet20 step at batch 128 took 12.9 ms eager and 2.29 ms as one
replayed CUDA graph (issue 22). :class:`TrainStep` runs the *whole* step (``zero_grad``, the
method's forward and backward passes with its noise draws and hooks, SAM's two passes, the
optimizer, and the step's bookkeeping: loss, correct count, step counter) in one of three modes:

* ``"eager"``: the step as Python runs it (the CPU's default, and ``--no-cuda-graph``);
* ``"static"``: the step in its capturable form, run eagerly: the batch is sampled, augmented
  and normalized on the device inside the step, into static buffers (:meth:`TrainStep.bind`,
  :meth:`dnq.data.BatchLoader.static_batch`: the batches iterating the loader gives), the
  learning rate is a device tensor that the scheduler fills in place, the optimizer is the
  fused SGD, and everything the method's step reads that changes between steps (lambda,
  the noise statistics) is a device tensor the method refreshes *before* the step
  (:meth:`dnq.methods.Method.prepare_step`). This is what is captured; on the CPU it is how the
  capturable step is tested;
* ``"graph"`` (CUDA): ``"static"``, and after warm-up steps on a side stream the step is captured
  once (the method's and the loader's random generators registered with the graph) and every later step is one
  ``replay()``. When the Python-side structure of the step changes (the noise switches on at
  ``lambda_start``, a site gains statistics), :meth:`dnq.methods.Method.graph_key` changes, and the
  step is captured again after one eager step.

Every step of every mode is a real training step: warm-up steps are the epoch's first steps,
run eagerly (the capture itself runs nothing, the replay that follows it runs the step). The
step makes no host read of a device value: the losses go into a per-epoch device buffer at the
device step counter, and the trainer reads them (the finite-loss check) every few hundred
steps and at the end of the epoch.

:func:`capture_unavailable` says why a run cannot be captured (DDP, ``torch.compile``, a host-side
noise sampler, no CUDA), and the trainer then runs eagerly and says so in one line.

Example:
    The capturable step run eagerly (``"static"``) on the CPU; its bookkeeping stays on the device.

    >>> import contextlib, torch, torch.nn as nn
    >>> from dnq.methods import make_method
    >>> from dnq.models import build_model
    >>> from dnq.step_graph import TrainStep, make_optimizer
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("cnn-digits", 10, 1, 8).train()
    >>> method = make_method("sgd")
    >>> method.setup(model, torch.randn(16, 1, 8, 8), torch.device("cpu"), seed=0, rank=0)
    >>> opt = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4, static=True)
    >>> step = TrainStep(model, method, opt, nn.CrossEntropyLoss(), contextlib.nullcontext, steps=4,
    ...                  mode="static")
    >>> step.new_epoch()
    >>> for _ in range(4):
    ...     step(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    >>> int(step.index), step.losses.shape, bool(torch.isfinite(step.losses).all())
    (4, torch.Size([4]), True)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from dnq_landscape_common.cli import first_line

STEP_MODES = ("eager", "static", "graph")
WARMUP_STEPS = 3
"""Eager steps on a side stream before the first capture (cuDNN's autotuning, cuBLAS workspaces
and the allocator settle there; PyTorch's whole-network capture recipe uses 3)."""
CHECK_EVERY = {"eager": 20, "static": 20, "graph": 200}
"""Steps between the trainer's reads of the losses (the finite-loss check and the progress bar);
a read waits for the GPU, so a replayed graph reads rarely."""


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   static: bool) -> torch.optim.SGD:
    """The trainer's SGD (Nesterov when ``momentum > 0``).

    ``static``: the capturable form, the fused SGD with the learning rate as a 0-dim tensor on the
    parameters' device (the scheduler fills it in place; the foreach SGD would read a tensor rate
    back to the host). Its updates differ from the foreach SGD's in the last bit of some elements.
    """
    params = list(model.parameters())
    kw = dict(momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if static:
        return torch.optim.SGD(params, lr=torch.tensor(float(lr), device=params[0].device), fused=True, **kw)
    return torch.optim.SGD(params, lr=lr, **kw)


def tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Make every group's ``lr`` a 0-dim tensor on its parameters' device, in place when it is one
    already (``load_state_dict`` puts back the float a checkpoint holds; a captured step reads the
    tensor it was captured with)."""
    for g in optimizer.param_groups:
        dev = g["params"][0].device
        if isinstance(g["lr"], torch.Tensor):
            continue
        g["lr"] = torch.tensor(float(g["lr"]), device=dev)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first group's learning rate as a float (a host read when it is a device tensor: call
    it outside the step loop)."""
    lr = optimizer.param_groups[0]["lr"]
    return float(lr)


def capture_unavailable(device: torch.device, *, world: int = 1, compiled: bool = False, method=None) -> str | None:
    """Why a training step on ``device`` cannot be captured in a CUDA graph, or None when it can.

    Example:
        >>> capture_unavailable(torch.device("cpu"))
        'CUDA graphs need a CUDA device'
    """
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if world > 1:
        return "DistributedDataParallel's gradient hooks are not captured (torchrun with more than one process)"
    if compiled:
        return "--compile: torch.compile's step is not captured here (its mode='reduce-overhead' has its own graphs)"
    return None if method is None else method.capture_unavailable()


class TrainStep:
    """The trainer's step in one of :data:`STEP_MODES` (see the module docstring).

    Args:
        net: the network the step runs (the model, or its DDP / compiled wrapper).
        method: the training method (:mod:`dnq.methods`), already set up.
        optimizer: the SGD (:func:`make_optimizer`; ``static=True`` for ``"static"`` and ``"graph"``).
        criterion, autocast: the loss and the autocast factory (:func:`dnq.train.make_autocast`;
            for ``"graph"`` its cache must be off, as CUDA graphs need).
        steps: steps per epoch (the size of the per-epoch loss buffer).
        mode: ``"eager"``, ``"static"`` or ``"graph"``.
        device: where the bookkeeping lives (default: the first parameter's).
        warmup: eager steps before the first capture.

    Attributes:
        losses: this epoch's loss per step (a device tensor).
        correct: this epoch's correct training predictions so far (device).
        index: the device step counter of this epoch.
        captures, replays, eager_steps: how the steps ran (host counters).
    """

    def __init__(self, net: nn.Module, method, optimizer: torch.optim.Optimizer, criterion, autocast, *,
                 steps: int, mode: str = "eager", device: torch.device | None = None, warmup: int = WARMUP_STEPS):
        if mode not in STEP_MODES:
            raise ValueError(f"unknown step mode {mode!r}; valid: {', '.join(STEP_MODES)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer (steps per epoch), got {steps!r}")
        device = device or next(net.parameters()).device
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"mode 'graph' needs a CUDA device, got {device}; use 'static' to run the capturable "
                             "step eagerly")
        if mode != "eager":
            for g in optimizer.param_groups:
                if not isinstance(g["lr"], torch.Tensor) or not g.get("fused"):
                    raise ValueError("a static step needs the fused SGD with a tensor learning rate "
                                     "(make_optimizer(..., static=True))")
        self.net, self.method, self.optimizer = net, method, optimizer
        self.criterion, self.autocast = criterion, autocast
        self.mode, self.warmup, self.device = mode, warmup, device
        self.losses = torch.zeros(steps, device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.index = torch.zeros((), device=device, dtype=torch.long)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.loader = None
        self.graph = None
        self._key = None
        self._pool = None
        self._warm = 0
        self.captures = self.replays = self.eager_steps = 0
        self.not_captured: str | None = None  # why a "graph" step fell back to running eagerly

    def new_epoch(self) -> None:
        """Reset the epoch's bookkeeping (in place: a captured step keeps writing to it)."""
        self.losses.zero_()
        self.correct.zero_()
        self.index.zero_()

    # -- the step ------------------------------------------------------------------------------
    def bind(self, loader) -> None:
        """Take every batch from ``loader`` (a training :class:`dnq.data.BatchLoader`) inside the
        step: :meth:`next` samples, augments and normalizes batch :attr:`index` into the static
        buffers on the device (:meth:`dnq.data.BatchLoader.static_batch`, the batches iterating
        would give), so a replay is the whole step. Call ``loader.begin_static_epoch()`` at
        every epoch start."""
        if self.mode == "eager":
            raise ValueError("an eager step takes its batches as arguments; bind() is for 'static' and 'graph'")
        per = loader.batch_size // loader.world_size
        shape = (per, *loader.x.shape[1:])
        fmt = torch.channels_last if loader.channels_last and len(shape) == 4 else torch.contiguous_format
        self.x = torch.empty(shape, dtype=loader.dtype, device=self.device).contiguous(memory_format=fmt)
        self.y = torch.empty(per, dtype=loader.y.dtype, device=self.device)
        self.loader = loader
        self.graph, self._key, self._warm = None, None, 0

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.loader is not None:
            self.loader.static_batch(self.index, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.method.step(self.net, x, y, self.criterion, self.autocast)
        self.optimizer.step()
        self.losses.index_copy_(0, self.index.view(1), loss.detach().float().view(1))
        self.correct.add_((logits.argmax(1) == y).sum())
        self.index.add_(1)

    def _inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch in the static buffers (allocated on the first batch and when the shape,
        dtype or layout changes, which also drops a captured graph)."""
        same = (self.x is not None and self.x.shape == x.shape and self.x.stride() == x.stride()
                and self.x.dtype == x.dtype and self.y.shape == y.shape)
        if not same:
            self.x = torch.empty_like(x, memory_format=torch.preserve_format)
            self.y = torch.empty_like(y)
            self.graph, self._key, self._warm = None, None, 0
        self.x.copy_(x)
        self.y.copy_(y)
        return self.x, self.y

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Run one training step on the batch ``(x, y)``; nothing is returned (read
        :attr:`losses`, :attr:`correct` and :attr:`index`)."""
        if self.loader is not None:
            raise ValueError("this step takes its batches from its loader (bind()): call next()")
        if self.mode == "eager":
            self._body(x, y)
            self.eager_steps += 1
            return
        self._run(*self._inputs(x, y))

    def next(self) -> None:
        """Run one training step on the bound loader's next batch (see :meth:`bind`)."""
        if self.loader is None:
            raise ValueError("no loader bound: call bind(loader) first, or pass the batch to the step")
        self._run(self.x, self.y)

    def _run(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        self.method.prepare_step()
        if self.mode == "static":
            self._body(xs, ys)
            self.eager_steps += 1
            return
        key = self.method.graph_key()
        if self.graph is not None and key == self._key:
            self.graph.replay()
            self.replays += 1
            return
        if self._warm < (self.warmup if self.captures == 0 else 1):
            self._side_stream_step(xs, ys)
            self._warm += 1
            return
        try:
            self._capture(xs, ys, key)
        except RuntimeError as e:  # the capture ran nothing: the step runs eagerly, and every later one
            self.graph, self.mode = None, "static"
            self.not_captured = f"the capture failed ({type(e).__name__}: {first_line(e)[:160]})"
            warnings.warn(f"the training step is not captured in a CUDA graph: {self.not_captured}; it runs eagerly",
                          stacklevel=3)
            self._body(xs, ys)
            self.eager_steps += 1
            return
        self.graph.replay()  # the capture ran nothing: this replay is the step
        self.replays += 1

    def _side_stream_step(self, x, y) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body(x, y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.eager_steps += 1

    def _capture(self, x, y, key) -> None:
        self.graph = None  # the old graph's memory goes back to the shared pool first
        graph = torch.cuda.CUDAGraph()
        gens = list(self.method.generators())
        if self.loader is not None and self.loader.augment:
            gens.append(self.loader.generator)
        for gen in gens:
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph, pool=self._pool):
            self._body(x, y)
        self._pool = graph.pool()
        self.graph, self._key, self._warm = graph, key, 0
        self.captures += 1

    def summary(self) -> dict:
        """How the steps ran so far (for ``config.json`` / the metrics log)."""
        out = {"mode": self.mode, "captures": self.captures, "replays": self.replays, "eager_steps": self.eager_steps}
        if self.not_captured:
            out["not_captured_because"] = self.not_captured
        return out


__all__ = ["CHECK_EVERY", "STEP_MODES", "TrainStep", "WARMUP_STEPS", "capture_unavailable", "current_lr",
           "make_optimizer", "tensor_lr"]
