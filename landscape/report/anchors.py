"""Published figures a study's own numbers are read against: the anchors of the report's
training × PTQ grid.

One table per published result (:data:`PUBLISHED`): the dataset and architecture it is for, its
source, the float model's top-1 accuracy and the top-1 accuracy of each PTQ method at each
bit-width, in percent, as printed. :func:`anchors_for` gives the ones that apply to a study
(same ``data`` and ``model``, and only the bit-widths the study has); the report shows them in
columns of their own beside the study's, labelled with the source, and never uses them in a
statistic, a "best" mark or a CSV of the study's own numbers (``summary.json`` keeps them apart,
under ``published_anchors``).

Example:
    >>> a = anchors_for({"data": "cifar100", "model": "resnet18", "bits": ["W4A4", "W3A3"]})
    >>> a["fp"], a["bits"]["W4A4"]["qdrop"], sorted(a["bits"])
    (79.4, 77.79, ['W4A4'])
    >>> anchors_for({"data": "cifar10", "model": "resnet18", "bits": ["W4A4"]}) is None
    True
"""

from __future__ import annotations

__all__ = ["PUBLISHED", "anchors_for", "column_label"]

#: the published tables, each for one (dataset, architecture); accuracies in percent (top-1, test split)
PUBLISHED = [
    {
        "data": "cifar100", "model": "resnet18",
        "source": "DNQ's authors' follow-up (CIFAR-100, ResNet-18; published figures, not measured here)",
        "short": "published",
        "setting": "a standard-trained ResNet-18 quantized by each method under the reconstruction papers' "
                   "convention (quantizers at layer and block outputs, first and last layer at 8 bits)",
        "fp": 79.40,
        "methods": ["adaround", "brecq", "qdrop"],
        "top1": {"W4A4": {"adaround": 77.46, "brecq": 77.61, "qdrop": 77.79},
                 "W2A4": {"adaround": 75.25, "brecq": 76.52, "qdrop": 76.41},
                 "W2A2": {"adaround": 70.70, "brecq": 72.13, "qdrop": 72.29}},
    },
]

_NAMES = {"adaround": "AdaRound", "brecq": "BRECQ", "qdrop": "QDrop", "fp": "FP"}


def column_label(method: str, short: str = "published") -> str:
    """The header of an anchor column: ``"QDrop (published)"``."""
    return f"{_NAMES.get(method, method)} ({short})"


def anchors_for(cfg: dict) -> dict | None:
    """The published figures that apply to a study (``cfg``: its configuration as in
    ``study.json``): the first table of :data:`PUBLISHED` for the study's ``data`` and ``model``,
    restricted to the bit-widths the study measures; None when no table applies.

    Returns:
        ``source``, ``short`` (the label of the columns), ``setting`` (what was published),
        ``fp`` (percent), ``methods`` (the PTQ methods of the table, in order) and ``bits``:
        ``{bits: {method: percent}}`` for the study's bit-widths that the table holds.
    """
    bits = [b for b in (cfg.get("bits") or []) if isinstance(b, str)]
    for table in PUBLISHED:
        if cfg.get("data") != table["data"] or cfg.get("model") != table["model"]:
            continue
        mine = {b: dict(table["top1"][b.upper()]) for b in bits if b.upper() in table["top1"]}
        if not mine:
            return None
        return {"source": table["source"], "short": table["short"], "setting": table["setting"], "fp": table["fp"],
                "methods": list(table["methods"]), "bits": mine}
    return None
