"""Choosing between engines that compute the same number, and recording the choice.

Several instruments can compute one quantity more than one way (a Hessian-vector product by
forward-over-reverse or double backward, a quadratic form by Taylor mode or from a product, a
surface point point by point or vmapped). Which is fastest depends on the model, the device
and the batch, so the choice is made once per operator (never per process: two operators on
different data may choose differently) and written down in a :class:`Choice`: what was chosen,
how (``"requested"`` by the caller, by a ``"rule"``, or by ``"timing"``), the timings and the
errors of the candidates that could not run. Results carry their operator's choices, so every
number says which engine produced it.

Under ``torch.distributed`` every rank must run the same engines (they issue the same
collectives): :meth:`Planner.decide` lets rank 0 decide and broadcasts its choice.

Example:
    >>> from landscape.planner import Planner
    >>> planner = Planner("cpu")
    >>> choice = planner.decide("product", {"a": lambda: 2.0, "b": lambda: 1.0})
    >>> (choice.engine, choice.how)
    ('b', 'timing')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .results import Result


def distributed() -> bool:
    """True inside a ``torch.distributed`` group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def short_error(e: BaseException) -> str:
    """``"Type: first line"`` of an exception, at most 200 characters of message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


@dataclass(repr=False)
class Choice(Result):
    """One recorded engine choice.

    Attributes:
        what: the quantity the engine computes (``"product"``, ``"quadratic"``, ``"surface"``, ...).
        engine: the chosen engine.
        how: ``"requested"`` (the caller named it), ``"rule"`` (a fixed rule, see ``reason``) or
            ``"timing"`` (the fastest candidate in seconds per unit of work).
        timings: seconds per unit of work of each timed candidate.
        errors: the candidates that could not run, with the error each raised.
        reason: a sentence for a rule or a request; empty for a timing.
        block: vectors (or points) per call the choice was timed at, when that is part of it.
    """

    what: str
    engine: str
    how: str
    timings: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    reason: str = ""
    block: int | None = None


class Planner:
    """Chooses engines for one operator and keeps its choices (:attr:`choices`, by ``what``).

    Args:
        device: where the candidates run (timings synchronize it).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.choices: dict[str, Choice] = {}

    def get(self, what: str) -> Choice | None:
        """The choice made for ``what``, or ``None``."""
        return self.choices.get(what)

    def record(self, choice: Choice) -> Choice:
        """Keep ``choice`` (a request or a rule) as the decision for ``choice.what``."""
        self.choices[choice.what] = choice
        return choice

    def decide(self, what: str, candidates: dict[str, Callable[[], float]], *, names: tuple[str, ...] | None = None,
               errors: dict[str, str] | None = None, catch: tuple = (RuntimeError, NotImplementedError)) -> Choice:
        """Run each candidate's timing function and keep the fastest.

        Args:
            what: the quantity.
            candidates: name -> a function that runs the candidate and returns its seconds per
                unit of work (it does its own warm-up and synchronization, see
                :func:`landscape._timing.best_of`). A candidate may be ``"name@block"``: the part
                after ``@`` is recorded as :attr:`Choice.block`.
            names: every candidate name any rank may choose, in a fixed order (for the
                broadcast under ``torch.distributed``); default: the keys of ``candidates``.
            errors: candidates already excluded (by a rule), with their reasons.
            catch: exception types that exclude a candidate instead of propagating.

        Raises:
            RuntimeError: no candidate ran; the message lists every candidate's error.
        """
        errors = dict(errors or {})
        timings: dict[str, float] = {}
        for name, fn in candidates.items():
            try:
                timings[name] = float(fn())
            except catch as e:
                errors[name] = short_error(e)
        if not timings:
            raise RuntimeError(f"no engine can compute the {what} for this model: {errors}")
        best = self.agree(min(timings, key=timings.get), tuple(names or candidates))
        engine, _, block = best.partition("@")
        return self.record(Choice(what, engine, "timing", timings, errors, "", int(block) if block else None))

    def agree(self, name: str, names: tuple[str, ...]) -> str:
        """Rank 0's ``name`` (one of ``names``, the same tuple on every rank) under
        ``torch.distributed``, so that every rank runs the same engines and collectives; ``name``
        itself otherwise."""
        if not distributed():
            return name
        pick = torch.tensor([names.index(name)], dtype=torch.int64,
                            device=self.device if self.device.type != "cpu" else "cpu")
        dist.broadcast(pick, 0)
        return names[int(pick[0])]

    def to_dict(self) -> dict:
        """Every choice, JSON-ready, by ``what``."""
        return {k: c.to_dict() for k, c in self.choices.items()}
