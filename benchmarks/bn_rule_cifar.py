"""The trainer's BatchNorm rule on resnet20 / CIFAR-10 subset (SGD, 15 epochs): accuracy with the
statistics as trained, recomputed over augmented batches (the trainer's rule), and recomputed
over non-augmented images (what the SWA path did before issue 9).

    python benchmarks/bn_rule_cifar.py --out runs/bn_rule_cifar     # needs ../shared/data/cifar10-subset.npz
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dnq.batchnorm import recompute_bn
from dnq.data import BatchLoader, load_dataset
from dnq.train import TrainConfig, evaluate, load_model, train
from dnq_landscape_common.precision import full_precision


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="npz:../shared/data/cifar10-subset.npz")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bn_rule_cifar")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    res = train(TrainConfig(data=a.data, model="resnet20", method="sgd", epochs=a.epochs, out=a.out, seed=a.seed),
                quiet=True, overwrite=True)
    model, meta = load_model(a.out)
    ds = load_dataset(meta["data"], val_size=meta["val_size"], val_seed=meta["val_seed"])
    loader = BatchLoader(ds, 128, True, a.seed, augment=False)
    loader.set_epoch(a.epochs)
    recompute_bn(model, loader)
    with full_precision():
        plain = {f"{s}_acc": evaluate(model, BatchLoader(ds, 1024, False, split=s))[1] for s in ("val", "test")}
    print(json.dumps({"train_s": time.perf_counter() - t0, "as_trained": res["bn_as_trained"],
                      "recomputed_augmented": {"val_acc": res["val_acc"], "test_acc": res["test_acc"]},
                      "recomputed_not_augmented": plain}, indent=1))


if __name__ == "__main__":
    main()
