"""What every measurement of one trained model reads: :class:`MeasureContext`.

A measurement is a function ``f(ctx, key) -> dict`` (:mod:`~landscape.study.measure_quant`,
:mod:`~landscape.study.measure_curvature`, :mod:`~landscape.study.measure_surfaces`,
:mod:`~landscape.study.measure_sampling`) of this context and its key
(:mod:`~landscape.study.keys`): the model, its dataset (the run's own splits), the curvature
images, the Hessian operator on them (made once, sharded across ranks under ``torchrun``), the
progress flag, and the measurements already recorded (which the sampling measurement reuses).

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
    ...                       nn.Linear(4 * 4 * 4, 3)).eval()
    >>> x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    >>> ctx = MeasureContext(model, ds=None, hdata=[(x[:4], y[:4]), (x[4:], y[4:])])
    >>> ctx.weight_bits("W4A4", 8)
    {'0': 8, '2': 4, '4': 8}
    >>> ctx.op().dim == sum(p.numel() for p in model.parameters())
    True
    >>> ctx.loss(model) > 0
    True
"""

from __future__ import annotations

import torch.nn as nn

from dnq.quant import execution_order, layer_bits, parse_bits, weight_quantized

from ..hessian import HessianOperator
from ..sensitivity_run import mean_loss

__all__ = ["MeasureContext"]


class MeasureContext:
    """The inputs every measurement of one trained model shares.

    Args:
        model: the trained model (float).
        ds: its dataset (:class:`dnq.data.Dataset`, on the measurement device), with the run's
            own validation split.
        hdata: the curvature images, ``[(inputs, targets), ...]`` batches
            (:func:`dnq.data.training_batches`).
        progress: progress bars.
        rank, world: this process's rank and the number of processes (Hessian products are
            sharded across ranks).
        recorded: the model's recorded measurements (``{name: {"key", "value", ...}}``).
        train_key: the model's training key (the digests of ``recorded`` hold it).
    """

    def __init__(self, model: nn.Module, ds, hdata: list, *, progress: bool = False, rank: int = 0, world: int = 1,
                 recorded: dict | None = None, train_key: str = ""):
        self.model, self.ds, self.hdata = model, ds, hdata
        self.progress, self.rank, self.world = progress, rank, world
        self.recorded = {} if recorded is None else recorded
        self.train_key = train_key
        self.loss_fn = nn.functional.cross_entropy
        self._op: HessianOperator | None = None
        self._order: list[str] | None = None

    def shard(self, batches: list) -> list:
        """This rank's share of ``batches`` (products are sharded across ranks)."""
        return batches[self.rank::self.world] if self.world > 1 else batches

    def op(self) -> HessianOperator:
        """The Hessian operator of the training loss on the curvature images (made once)."""
        if self._op is None:
            self._op = HessianOperator(self.model, self.loss_fn, self.shard(self.hdata))
        return self._op

    def loss(self, model: nn.Module) -> float:
        """The mean loss of ``model`` on the curvature images (every batch, on every rank)."""
        return mean_loss(model, self.hdata, self.loss_fn)

    def weight_bits(self, bits: str, first_last_bits: int | None) -> dict[str, int]:
        """Weight bits per Conv/Linear layer as PTQ gives them (first/last in execution order at
        ``first_last_bits``: :func:`dnq.quant.layer_bits`)."""
        (w, a), = parse_bits(bits)
        if self._order is None:
            self._order = execution_order(self.model, self.hdata[0][0])
        return {n: wb for n, (wb, _) in layer_bits(self._order, w, a, first_last_bits).items()}

    def weight_quantized(self, bits: str, first_last_bits: int | None) -> nn.Module:
        """A copy with every Conv/Linear weight replaced by Q(W) (no BatchNorm folding): the
        quantizer of :func:`dnq.quant.weight_error` (symmetric per-channel min-max), at the bits
        PTQ gives each layer."""
        return weight_quantized(self.model, self.weight_bits(bits, first_last_bits))
