"""The study's presets and the defaults of its ``ptq`` and ``mixed`` sections.

:data:`PRESETS`: ``digits`` (the default, sized for a 2-core CPU), ``cifar10-subset`` (resnet20 on
the CIFAR-10 subset: sgd, dnq, gaussian and sam, 2 seeds, PTQ rtn, rtn+bn and qdrop at 500 steps
per block), ``cifar100`` (the DNQ paper's setting for a GPU: 120 epochs, W4A4 / W2A4 / W2A2,
every PTQ method at the papers' 20,000 steps) and ``paper`` (the seed's table: resnet18 on
CIFAR-100, sgd and dnq trained for each of W4A4 / W2A4 / W2A2, 3 seeds, PTQ rtn, rtn+bn and
qdrop under the reconstruction papers' quantization convention); their measured wall times are
in BENCHMARKS.md, and ``landscape study --plan`` estimates a study's time before it runs.
A preset is a mapping of study keys (:class:`landscape.study.StudyConfig`); a study file's keys
override it (:func:`landscape.study.load_config`). This module imports nothing.

Example:
    >>> sorted(PRESETS)
    ['cifar10-subset', 'cifar100', 'digits', 'paper']
    >>> DEFAULT_PTQ["variants"], DEFAULT_PTQ["convention"], DEFAULT_MIXED["budgets"]
    (['rtn', 'rtn+bn'], 'dnq', [2.5, 3.0])
    >>> [r.get("train_bits") for r in PRESETS["paper"]["runs"]]
    [None, ['W4A4', 'W2A4', 'W2A2']]
"""

__all__ = ["DEFAULT_MIXED", "DEFAULT_PTQ", "PRESETS", "PTQ_KEYS_OMITTED_AT_DEFAULT"]

# The PTQ every model of a study gets (the same for every training method): recorded in study.json
# and stated in the report's header. PTQ methods ("variants", or a plain list `ptq = [...]`):
# "rtn" (round to nearest with min-max ranges, BatchNorm folded with the model's statistics),
# "rtn+bn" (the same, with BatchNorm statistics re-estimated on the calibration images through the
# quantized model before folding), and the reconstruction methods "adaround", "brecq", "qdrop"
# (dnq.recon.reconstruct: BatchNorm folded, initial ranges "recon_range", "recon_iters" steps per
# block (null: 20,000 on a GPU, 500 on a CPU), batch "recon_batch_size", "recon_calib_size" images).
# "convention" (dnq.convention): where the quantizers sit and how the methods run, "dnq" (the toolkit's own, the
# default) or "paper" (the BRECQ / QDrop reference code's); "recon_lr_rule": the reconstruction's learning rates,
# null (the convention's own), "paper" (the papers' fixed rates) or "scaled" (scaled by 20,000 / recon_iters). At
# their defaults both are left out of the PTQ measurements' keys and of the study's hash, so the studies stored
# before they existed keep every measurement.
DEFAULT_PTQ = {"variants": ["rtn", "rtn+bn"], "weight_mode": "symmetric", "weight_granularity": "per output channel",
               "act": "asymmetric per tensor", "range": "minmax", "first_last_bits": 8, "calib_size": 256,
               "calib_split": "train (validation images excluded)", "fold_bn": True, "recon_iters": None,
               "recon_calib_size": 1024, "recon_batch_size": 32, "recon_range": "mse", "convention": "dnq",
               "recon_lr_rule": None}
#: the ``ptq`` keys added after studies were stored, with the value those studies had (left out of the hash there)
PTQ_KEYS_OMITTED_AT_DEFAULT = {"convention": "dnq", "recon_lr_rule": None}

# Mixed precision (`mixed` in a study; null: none). Per model: the per-layer sensitivity (predicted, hawq, measured;
# landscape.sensitivity_run) on the curvature images at the candidate "bits", then for every PTQ method of "methods",
# budget (average weight bits of the allocated layers; first and last layer at ptq.first_last_bits) and objective
# an allocation (dnq.mixed.plan) and its accuracy; and the uniform line at "uniform_bits" (activations at "abits").
DEFAULT_MIXED = {"budgets": [2.5, 3.0], "objectives": ["predicted", "hawq", "measured"], "methods": ["rtn+bn"],
                 "abits": 4, "bits": [2, 3, 4, 8], "uniform_bits": [2, 3, 4], "matvecs": 64, "kind": "avg-bits",
                 "tie_shared_inputs": False}


PRESETS: dict[str, dict] = {
    "digits": {
        "name": "digits", "data": "digits", "model": "cnn-digits",
        # gaussian / gaussian-iso at lambda 1: the variance of DNQ's measured weight error, not tuned
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [0.5, 1.0, 2.0]},
                 {"method": "dnq-w", "lambda_max": [1.0]}, {"method": "dnq-a", "lambda_max": [1.0]},
                 {"method": "gaussian", "lambda_max": [1.0]}, {"method": "gaussian-iso", "lambda_max": [1.0]},
                 {"method": "sam", "sam_rho": [0.02, 0.1, 0.3]}],
        "seeds": [0, 1], "bits": ["W4A4", "W3A3", "W2A4"], "train_bits": "W3A3",
        "train": {"epochs": 12, "batch_size": 128, "lr": 0.1},
        # 512 curvature images: the smallest size whose trace and top eigenvalue move at most 2.5% between disjoint
        # image subsets, and the most the demo's time allows (BENCHMARKS.md, sampling error, issue 13)
        "instruments": {"hessian_samples": 512, "trace_matvecs": 48, "eig_k": 3, "density_runs": 2,
                        "density_steps": 32, "block_matvecs": 16, "noise_matvecs": 32, "surface_steps": 11,
                        "slice_steps": 21},
        "mixed": {"budgets": [2.5, 3.0], "methods": ["rtn+bn"]},
    },
    "cifar10-subset": {
        # the seeded 10,000-image subset of torchvision's CIFAR-10 under data_root (dnq.data, "cifar10-subset"; fetch
        # CIFAR-10 once with `dnq train --data cifar10 --download ...`), or --set data=npz:PATH for a file of it
        "name": "cifar10-subset", "data": "cifar10-subset", "model": "resnet20",
        # one strength per method, each method's published CIFAR default (DNQ lambda 1, SAM rho 0.05; gaussian
        # at lambda 1 is the variance of DNQ's measured weight error), not tuned: see the README's caveats
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [1.0]}, {"method": "gaussian", "lambda_max": [1.0]},
                 {"method": "sam", "sam_rho": [0.05]}],
        "seeds": [0, 1], "bits": ["W4A4", "W3A3", "W2A4"], "train_bits": "W3A3",
        "train": {"epochs": 12, "batch_size": 128, "lr": 0.1},
        # sized for a 2-core CPU: training, instrument and QDrop times per model in BENCHMARKS.md (cifar10-subset);
        # 512 curvature images: at 256 the trace moved 3.6-4.7% between disjoint image subsets, at 512 2.7-3.5%
        # (BENCHMARKS.md, sampling error, issue 13)
        "instruments": {"hessian_samples": 512, "trace_matvecs": 24, "eig_k": 2, "density_runs": 1,
                        "density_steps": 16, "block_matvecs": 4, "noise_matvecs": 8, "surface_steps": 7,
                        "slice_steps": 11},
        # QDrop at 500 steps per block (the papers: 20,000), 1,024 calibration images (time: BENCHMARKS.md), the
        # budget-scaled rates: in BENCHMARKS.md's budget table (issue 23; paper convention) 500 scaled steps are the
        # best or within 0.5 points of the best validation accuracy of each method, the papers' fixed rates lose
        # 7-12 points at W2A4 and 2,000 steps gain nothing. The dnq convention stays (the mixed-precision section
        # needs it); the papers' places: --set ptq.convention=paper --set mixed=null
        "ptq": {"variants": ["rtn", "rtn+bn", "qdrop"], "recon_iters": 500, "recon_calib_size": 1024},
        # mixed precision at 2.5 and 3 average weight bits (A4) under rtn+bn, every objective (BENCHMARKS.md: time)
        "mixed": {"budgets": [2.5, 3.0], "methods": ["rtn+bn"]},
    },
    "cifar100": {
        "name": "cifar100", "data": "cifar100", "model": ["resnet20", "resnet56", "resnet18", "mobilenetv2"],
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [1.0]}, {"method": "gaussian", "lambda_max": [1.0]},
                 {"method": "sam", "sam_rho": [0.05]}],
        "seeds": [0, 1], "bits": ["W4A4", "W2A4", "W2A2"], "train_bits": "W4A4",
        "train": {"epochs": 120, "batch_size": 128, "lr": 0.1},
        "instruments": {"hessian_samples": 4096, "hessian_batch": 512, "trace_matvecs": 96, "eig_k": 5,
                        "density_runs": 4, "density_steps": 64, "block_matvecs": 32, "noise_matvecs": 64,
                        "surface_steps": 21, "slice_steps": 41},
        # the papers' reconstruction: 20,000 steps per block, batch 32, 1,024 calibration images (README: wall time)
        "ptq": {"variants": ["rtn", "rtn+bn", "adaround", "brecq", "qdrop"], "recon_iters": 20000,
                "recon_calib_size": 1024},
    },
    "paper": {
        # The seed's table: resnet18 on CIFAR-100, the bit-widths of the published reconstruction table (W4A4, W2A4,
        # W2A2; the report shows the published figures beside ours, landscape.report.anchors), sgd once and dnq
        # trained for each of them (a run's "train_bits" list sweeps like lambda_max: one dnq model per target), 3
        # seeds: 4 configurations x 3 seeds = 12 models.
        "name": "paper", "data": "cifar100", "model": "resnet18",
        "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [1.0], "train_bits": ["W4A4", "W2A4", "W2A2"]}],
        "seeds": [0, 1, 2], "bits": ["W4A4", "W2A4", "W2A2"], "train_bits": "W4A4",
        # The DNQ paper's CIFAR-100 recipe as the README documents it (the cifar100 preset's): 120 epochs, batch 128,
        # SGD with Nesterov momentum 0.9, learning rate 0.1 with a cosine schedule, weight decay 5e-4 (the trainer's
        # defaults for momentum, weight decay and label smoothing 0.1); the same recipe for sgd and dnq.
        "train": {"epochs": 120, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
        # the cifar100 preset's instruments (4,096 curvature images in batches of 512)
        "instruments": {"hessian_samples": 4096, "hessian_batch": 512, "trace_matvecs": 96, "eig_k": 5,
                        "density_runs": 4, "density_steps": 64, "block_matvecs": 32, "noise_matvecs": 64,
                        "surface_steps": 21, "slice_steps": 41},
        # PTQ under the papers' convention (dnq.convention "paper": quantizers at layer and block outputs, asymmetric
        # weights, the papers' fixed learning rates). recon_iters 20,000: chosen from BENCHMARKS.md's budget table
        # (issue 23). AdaRound and BRECQ are one setting away:
        #   --set 'ptq.variants=["rtn","rtn+bn","adaround","brecq","qdrop"]'
        "ptq": {"variants": ["rtn", "rtn+bn", "qdrop"], "convention": "paper", "recon_iters": 20000,
                "recon_calib_size": 1024},
    },
}
