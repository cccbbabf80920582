import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from dnq.data import BatchLoader, DataError, load_dataset, random_crop_flip


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert int(a.x_train.max()) == 16 and a.max_value == 16.0 and not a.augment
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    x = a.normalize(a.x_train)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_npz_hwc_and_chw_load_the_same(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 20)
    np.savez(tmp_path / "hwc.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    np.savez(tmp_path / "chw.npz", x_train=x.transpose(0, 3, 1, 2), y_train=y, x_test=x[:5].transpose(0, 3, 1, 2),
             y_test=y[:5])
    a, b = load_dataset(f"npz:{tmp_path / 'hwc.npz'}"), load_dataset(f"npz:{tmp_path / 'chw.npz'}")
    assert a.x_train.shape == (20, 3, 32, 32) and torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_train[3, 1], torch.from_numpy(x[3, :, :, 1]))
    assert a.augment and a.num_classes == int(y.max()) + 1


def test_npz_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(DataError, match="x_test"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "f.npz", x_train=np.zeros((2, 8, 8, 3)), y_train=np.zeros(2), x_test=np.zeros((2, 8, 8, 3)),
             y_test=np.zeros(2))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")


def test_missing_cifar_names_path_and_flag(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", data_root=str(tmp_path))
    assert str(tmp_path) in str(e.value) and "--download" in str(e.value)


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    assert "digits" in str(e.value) and "cifar10" in str(e.value) and "npz:PATH" in str(e.value)


def test_random_crop_flip_matches_torchvision_per_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the draws
    oy = torch.randint(0, 9, (6,), generator=g)
    ox = torch.randint(0, 9, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    for i in range(6):
        ref = TF.crop(TF.pad(x[i], [4]), int(oy[i]), int(ox[i]), 32, 32)
        if flip[i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref)


def test_loader_is_seeded_per_epoch_and_shards_cover_the_batch():
    ds = load_dataset("digits")
    a = BatchLoader(ds, 64, True, seed=3)
    a.set_epoch(2)
    first = [y.clone() for _, y in a]
    a.set_epoch(2)
    again = [y for _, y in a]
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    a.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], first[0])
    shards = []
    for r in range(2):
        s = BatchLoader(ds, 64, True, seed=3, rank=r, world_size=2)
        s.set_epoch(2)
        shards.append([x for x, _ in s])
    a.set_epoch(2)
    for (x, _), s0, s1 in zip(a, *shards):
        assert torch.equal(torch.cat([s0, s1]), x)
    with pytest.raises(DataError, match="divisible"):
        BatchLoader(ds, 63, True, world_size=2)


def test_test_loader_sees_every_sample_once():
    ds = load_dataset("digits")
    ys = torch.cat([y for _, y in BatchLoader(ds, 100, False)])
    assert torch.equal(ys, ds.y_test)


def test_validation_split_is_stratified_disjoint_and_seeded_by_its_own_seed():
    from dnq.data import resolve_val_size

    full = load_dataset("digits")
    a = load_dataset("digits", val_size="auto")
    b = load_dataset("digits", val_size="auto", val_seed=0)
    c = load_dataset("digits", val_size="auto", val_seed=1)
    assert (full.val_size, a.val_size) == (0, 287) and len(a.x_train) == 1150 and torch.equal(a.x_test, full.x_test)
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    # a partition of the original training split: every image exactly once
    key = lambda x: sorted(map(bytes, x.reshape(len(x), -1).numpy()))  # noqa: E731
    assert key(torch.cat([a.x_train, a.x_val])) == key(full.x_train)
    # stratified: every class's share in validation within one image of its share in training
    counts_full = np.bincount(full.y_train.numpy(), minlength=10)
    counts_val = np.bincount(a.y_val.numpy(), minlength=10)
    assert np.all(np.abs(counts_val - counts_full * 287 / 1437) <= 1)
    # the normalization statistics are those of the whole training split (the model's input
    # pipeline does not depend on the split)
    assert a.mean == full.mean and a.std == full.std
    # the calibration images come from what is left of the training split
    calib = a.calibration_inputs(256, 0)
    val_set = set(map(bytes, a.normalize(a.x_val).reshape(287, -1).numpy()))
    assert not any(bytes(r) in val_set for r in calib.reshape(256, -1).numpy())
    assert resolve_val_size("auto", "cifar10", 50_000) == 5000 and resolve_val_size("auto", "npz:x", 10_000) == 1000
    assert resolve_val_size(0.25, "digits", 1437) == 359 and resolve_val_size(None, "digits", 1437) == 0
    with pytest.raises(DataError, match="0..1436"):
        resolve_val_size(1437, "digits", 1437)


def test_cifar10_subset_is_a_seeded_per_class_choice_from_torchvision(monkeypatch):
    """torchvision's CIFAR-10 cannot be downloaded here: its loader is replaced by one of the same
    shapes, and what the toolkit adds (the seeded per-class choice and shuffle) is checked."""
    import dnq.data as data

    rng = np.random.default_rng(1)
    ytr, yte = np.repeat(np.arange(10), 1100), np.repeat(np.arange(10), 250)
    xtr = rng.integers(0, 256, (len(ytr), 3, 32, 32), dtype=np.uint8)
    xte = rng.integers(0, 256, (len(yte), 3, 32, 32), dtype=np.uint8)
    calls = []

    def fake(name, root, download):
        calls.append((name, root, download))
        return xtr, xte, ytr, yte

    monkeypatch.setattr(data, "_load_torchvision", fake)
    a = data.load_dataset("cifar10-subset", "somewhere")
    b = data.load_dataset("cifar10-subset", "somewhere")
    assert calls[0] == ("cifar10", "somewhere", False)
    assert tuple(a.x_train.shape) == (10000, 3, 32, 32) and tuple(a.x_test.shape) == (2000, 3, 32, 32)
    assert np.bincount(a.y_train.numpy()).tolist() == [1000] * 10
    assert np.bincount(a.y_test.numpy()).tolist() == [200] * 10
    assert a.fingerprint() == b.fingerprint()  # the same subset every time
    assert a.y_train[:20].tolist() != sorted(a.y_train[:20].tolist())  # shuffled
    # every chosen image is one of the source's, with its own label
    src = {xtr[i].tobytes(): ytr[i] for i in range(len(ytr))}
    assert all(src[a.x_train[i].numpy().tobytes()] == a.y_train[i] for i in range(0, 10000, 97))
    assert a.num_classes == 10 and a.augment


def test_one_class_data_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "one.npz"
    np.savez(path, x_train=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), y_train=np.full(32, 3),
             x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    with pytest.raises(DataError, match="every training label is 3: a classifier needs at least 2 classes"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("world_size,rank,channels_last", [(1, 0, False), (1, 0, True), (2, 1, True)])
def test_static_batches_are_the_batches_iteration_gives(device, world_size, rank, channels_last):
    """The capturable batch (dnq.step_graph samples it inside the step) is the iterated batch bit
    for bit: same order, augmentation, normalization, shard and layout, over two epochs."""
    ds = load_dataset("synthetic:10:80:32")
    ds.to(torch.device(device))
    assert ds.augment
    loader = BatchLoader(ds, 16, True, seed=3, rank=rank, world_size=world_size, channels_last=channels_last)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        want = list(loader)
        loader.begin_static_epoch()
        x = torch.empty_like(want[0][0], memory_format=torch.preserve_format)
        y = torch.empty_like(want[0][1])
        for i, (wx, wy) in enumerate(want):
            loader.static_batch(torch.tensor(i, device=device), x, y)
            assert torch.equal(x, wx) and torch.equal(y, wy)
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    with pytest.raises(DataError, match="training loader"):
        BatchLoader(ds, 16, False).begin_static_epoch()
