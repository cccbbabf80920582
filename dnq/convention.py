"""Named quantization conventions: where the quantizers sit and how the PTQ methods run.

Two conventions (:data:`CONVENTIONS`), chosen with ``--convention`` (``dnq ptq``) or the study's
``ptq.convention``, and recorded in ``ptq.json``, the study's records and the report's header:

* ``"dnq"``: the toolkit's own, the default and the behaviour before the conventions had names.
  Activations are quantized asymmetric per tensor at the *input* of every Conv/Linear layer (the
  image included; a residual block's skip path adds float values and block outputs are never
  quantized); weights symmetric per output channel on a narrow grid of ``2^b - 1`` levels; the
  first and last layer (weights and input activations) at 8 bits. QDrop mixes each quantizer's
  output with its own float input, ``drop_prob`` being the probability of *float*; AdaRound's layer
  loss is taken on the layer's output, before its activation; learning rates are scaled with
  the step budget (:func:`dnq.recon.budget_lrs`).
* ``"paper"``: the BRECQ / QDrop reference code's (github.com/yhhhli/BRECQ,
  github.com/wimh966/QDrop, read at their published commits):

  - activation quantizers at the *outputs*: every layer followed by an activation is quantized
    after the activation, every block (residual, inverted-residual) after the residual add and
    its activation; the convolution before a residual add and a shortcut convolution are not
    quantized at their outputs, the image is not quantized, and the network's output is not;
  - weights asymmetric per output channel with ``2^b`` levels (``[0, 2^b - 1]``);
  - first and last layer as QDrop sets them: their weights at 8 bits, and the last activation
    quantizer (the one feeding the classifier) at 8 bits; the first layer's output is quantized
    at the setting's activation bits;
  - QDrop: each block's input mixed element-wise between the quantized model's input and the
    float model's input, and every activation quantizer of the block (its output's included,
    inside the loss) mixed between its quantized and its float value; ``drop_prob`` is the
    probability of staying *quantized* (the official code's meaning; 0.5 by default);
  - AdaRound reconstructs each layer through its following activation (and output quantizer);
  - BRECQ's published learning rates: Adam 1e-3 for the rounding variables, 4e-4 with a cosine
    decay for the activation step sizes, at the papers' 20,000 / 5,000 steps (QDrop: 1e-3 and
    4e-5), not scaled with the budget unless asked (``lr_rule="scaled"``);
  - the learned step sizes kept positive (``|s|``, at least float32's epsilon) on every forward.

The places are computed from the float model by :func:`dnq.act_sites.act_sites` (a torch.fx
trace) for the architectures the paper convention knows: the CIFAR ResNets (resnet20, resnet56),
torchvision's ResNets (resnet18), MobileNetV2 and the Sequential CNNs (cnn-digits, mlp-digits).

Example:
    >>> check_convention("paper")
    'paper'
    >>> describe("paper")["weights"]
    'asymmetric uniform, per output channel, 2^b levels [0, 2^b - 1]'
"""

from __future__ import annotations

CONVENTIONS = ("dnq", "paper")
"""The quantization conventions: the toolkit's own (``dnq``) and the reconstruction papers' (``paper``)."""
DEFAULT_CONVENTION = "dnq"

_DESCRIPTIONS = {
    "dnq": {
        "convention": "dnq",
        "source": "this toolkit's own convention (the behaviour before conventions had names)",
        "weights": "symmetric uniform, per output channel, narrow grid of 2^b - 1 levels [-(2^(b-1) - 1), "
                   "2^(b-1) - 1]",
        "activations": "asymmetric uniform, per tensor, at the input of every Conv/Linear layer (the image "
                       "included); residual skip paths add float values, block outputs not quantized",
        "first_last": "first and last Conv/Linear layer in execution order: weights and input activations at "
                      "first_last_bits",
        "qdrop_mix": "each quantizer's output mixed with its own float input (the quantized model's, upstream "
                     "error included); drop_prob = probability of float",
        "adaround_loss": "the layer's output, before its activation",
        "learning_rates": "scaled with the budget: the papers' 1e-3 / 4e-5 at 20,000 steps times 20000/steps "
                          "(at most 100x)",
        "step_size_sign": "kept positive at the end of each unit",
    },
    "paper": {
        "convention": "paper",
        "source": "BRECQ (github.com/yhhhli/BRECQ) and QDrop (github.com/wimh966/QDrop) reference code",
        "weights": "asymmetric uniform, per output channel, 2^b levels [0, 2^b - 1]",
        "activations": "asymmetric uniform, per tensor, at layer and block outputs after the activation (blocks "
                       "after the residual add), the inputs that feed the next layer or block; the image and the "
                       "network output not quantized",
        "first_last": "first and last layer's weights at first_last_bits (8), the activation quantizer feeding "
                      "the last layer at first_last_bits, the first layer's output at the setting's bits (QDrop)",
        "qdrop_mix": "the block input mixed element-wise between the quantized model's and the float model's, "
                     "every activation quantizer of the block mixed between quantized and float, the block "
                     "output quantized inside the loss; drop_prob = probability of staying quantized (QDrop's "
                     "code)",
        "adaround_loss": "the layer's output after its activation and output quantizer",
        "learning_rates": "the papers': rounding 1e-3; step sizes 4e-4 (BRECQ, 5,000 steps) or 4e-5 (QDrop), "
                          "cosine-decayed",
        "step_size_sign": "|s| clamped to float32's epsilon on every forward",
    },
}


def check_convention(convention) -> str:
    """Validate a convention name (a ValueError naming the valid ones) and return it."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown quantization convention {convention!r}; valid: {', '.join(CONVENTIONS)} "
                         f"(dnq: this toolkit's own; paper: the BRECQ / QDrop reference code's)")
    return convention


def describe(convention: str) -> dict:
    """What a convention means, as ``ptq.json``, the study's records and the report state it."""
    return dict(_DESCRIPTIONS[check_convention(convention)])


__all__ = ["CONVENTIONS", "DEFAULT_CONVENTION", "check_convention", "describe"]
