"""The capturable training step (dnq.step_graph, issue 22).

The shared tests run on every available device (``device`` fixture: the CPU in CI, CUDA on a GPU
machine) with the same assertions; only what needs a GPU (a replayed graph equals the eager
step, the capture count) is CUDA-only.
"""

import contextlib
import json
import warnings

import pytest
import torch
import torch.nn as nn

import dnq.train as train_mod
from dnq.data import BatchLoader, load_dataset
from dnq.methods import METHODS, make_method
from dnq.models import build_model
from dnq.step_graph import TrainStep, capture_unavailable, make_optimizer, tensor_lr
from dnq.train import TrainConfig, _Run, make_autocast, train
from tests.dnq.test_devices import _deterministic
from tests.dnq.test_gpu_paths import _HostReads

CHECKED = ("sgd", "dnq", "sam", "gaussian-walk")


def _setup(dev, method_name, mode, *, model_name="resnet20", batch=16, amp=True, sampler="fresh", seed=0, n=48,
           bind=True):
    """A model, its method and a TrainStep of ``mode`` on ``dev`` with a LambdaLR schedule, and a loader
    (``n`` images: 48 are 3 steps an epoch, so rounding differences stay small) that a static or
    graph step samples its batches from (``bind``)."""
    dev = torch.device(dev)
    ds = load_dataset(f"synthetic:10:{n}:32")
    ds.to(dev)
    loader = BatchLoader(ds, batch, True, seed=seed, channels_last=True)
    torch.manual_seed(seed)
    model = build_model(model_name, 10, 3, 32).to(dev).to(memory_format=torch.channels_last).train()
    method = make_method(method_name, 4, 4, act_sampler=sampler)
    method.setup(model, ds.calibration_inputs(32).contiguous(memory_format=torch.channels_last), dev, seed, 0)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4, static=mode != "eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    step = TrainStep(model, method, opt, nn.CrossEntropyLoss(label_smoothing=0.1),
                     make_autocast(dev, amp, cache=mode != "graph"), steps=len(loader), mode=mode, device=dev)
    if bind and mode != "eager":
        step.bind(loader)
    return model, method, step, sched, loader


def _batches(step, loader):
    """Run the epoch's steps: from the bound loader (inside the step), or iterating it."""
    if step.loader is not None:
        loader.begin_static_epoch()
        for _ in range(len(loader)):
            yield step.next
    else:
        for x, y in loader:
            yield lambda x=x, y=y: step(x, y)


def _epochs(model, method, step, sched, loader, epochs=2, lams=(1.0, 0.5)):
    for e in range(epochs):
        loader.set_epoch(e)
        method.on_epoch_start(e, lams[e] if method.uses_noise else 0.0)
        step.new_epoch()
        for run in _batches(step, loader):
            run()
            sched.step()
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method_name", CHECKED)
def test_the_static_step_trains_as_the_eager_step_does(device, method_name):
    """The capturable form (batches sampled and augmented inside the step into static buffers, fused
    SGD with a tensor rate, device noise coefficients) gives the eager step's weights to float
    rounding (the fused SGD rounds differently in the last bit), over two epochs with a lambda
    change between them; the losses agree too. Training amplifies those last bits: the weights
    differ by up to 5e-4 with one thread (DNQ), against the 1e-2 and more a wrong batch, noise or
    rate would give."""
    runs = {}
    for mode in ("eager", "static"):
        model, method, step, sched, loader = _setup(device, method_name, mode, amp=False)
        runs[mode] = (_epochs(model, method, step, sched, loader), step.losses.clone(), int(step.index))
    (w_e, l_e, n_e), (w_s, l_s, n_s) = runs["eager"], runs["static"]
    assert n_e == n_s == len(l_e)
    assert torch.isfinite(l_s).all()
    assert torch.allclose(l_e, l_s, rtol=1e-4, atol=1e-5), (l_e, l_s)
    assert torch.allclose(w_e, w_s, rtol=1e-4, atol=2e-3), (w_e - w_s).abs().max()


@pytest.mark.parametrize("method_name", METHODS)
def test_a_static_step_reads_nothing_back_from_the_device(device, method_name):
    """After the first step (which plans the noise sites), a static step with its schedule step
    reads no tensor back to the host and builds no tensor from Python data, for every method."""
    model, method, step, sched, loader = _setup(device, method_name, "static")
    method.on_epoch_start(0, 1.0)
    step.new_epoch()
    for i, run in enumerate(_batches(step, loader)):  # the batch is sampled and augmented inside the step
        with _HostReads() if i > 0 else contextlib.nullcontext() as spy:
            run()
            sched.step()
        if i > 0:
            assert spy.calls == [], spy.calls
    assert int(step.index) == len(loader) and torch.isfinite(step.losses).all()


def test_the_noise_coefficients_are_device_tensors_refreshed_in_place(device):
    """lambda and the activation statistics reach a (captured) step through device tensors that
    keep their identity: a new epoch's statistics and lambda change their values, not the tensors."""
    model, method, step, sched, loader = _setup(device, "dnq", "static")
    method.on_epoch_start(0, 1.0)
    method.prepare_step()
    coef = method.noise._coef_tensors(torch.device(device))
    name = next(iter(coef))
    before = [t for pair in coef.values() for t in pair]
    mu, sd = (float(t) for t in coef[name])
    assert (mu, sd) == pytest.approx((method.noise.a_mean[name], method.noise.a_var[name] ** 0.5), rel=1e-6)
    method.on_epoch_start(1, 0.25)
    method.prepare_step()
    after = method.noise._coef_tensors(torch.device(device))
    assert [t for pair in after.values() for t in pair] == before  # the same tensor objects
    assert float(after[name][1]) == pytest.approx(0.25 * method.noise.a_var[name] ** 0.5, rel=1e-6)
    assert method.graph_key() == (True, method.noise.act_noise_key())


def test_the_noise_generators_are_reseeded_not_replaced(device):
    model, method, step, sched, loader = _setup(device, "dnq", "static")
    method.on_epoch_start(0, 1.0)
    gens = method.generators()
    assert len(gens) == 2
    a = torch.empty(4, device=device).normal_(generator=gens[0])
    method.on_epoch_start(1, 1.0)
    assert method.generators() == gens  # the same objects, reseeded for epoch 1
    method.on_epoch_start(0, 1.0)
    assert torch.equal(torch.empty(4, device=device).normal_(generator=gens[0]), a)  # epoch 0's stream again


def test_capture_is_refused_with_the_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert capture_unavailable(cpu) == "CUDA graphs need a CUDA device"
    assert "DistributedDataParallel" in capture_unavailable(cuda, world=2)
    assert "--compile" in capture_unavailable(cuda, compiled=True)
    model = build_model("cnn-digits", 10, 1, 8)
    table = make_method("dnq", 4, 4, act_sampler="table")
    table.setup(model, torch.randn(8, 1, 8, 8), cpu, 0, 0)
    assert "--act-sampler table" in capture_unavailable(cuda, method=table)
    fresh = make_method("dnq", 4, 4, act_sampler="fresh")
    fresh.setup(model, torch.randn(8, 1, 8, 8), cpu, 0, 0)
    assert capture_unavailable(cuda, method=fresh) is None
    assert capture_unavailable(cuda, method=make_method("sam")) is None


def test_train_step_validates_its_settings():
    model = build_model("cnn-digits", 10, 1, 8)
    method = make_method("sgd")
    method.setup(model, torch.randn(8, 1, 8, 8), torch.device("cpu"), 0, 0)
    float_lr = make_optimizer(model, 0.1, 0.9, 0.0, static=False)
    with pytest.raises(ValueError, match="fused SGD with a tensor learning rate"):
        TrainStep(model, method, float_lr, nn.CrossEntropyLoss(), contextlib.nullcontext, steps=2, mode="static")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TrainStep(model, method, make_optimizer(model, 0.1, 0.9, 0.0, static=True), nn.CrossEntropyLoss(),
                  contextlib.nullcontext, steps=2, mode="graph", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown step mode"):
        TrainStep(model, method, float_lr, nn.CrossEntropyLoss(), contextlib.nullcontext, steps=2, mode="fast")


def test_tensor_lr_survives_a_checkpoint_round_trip():
    model = build_model("cnn-digits", 10, 1, 8)
    opt = make_optimizer(model, 0.1, 0.9, 0.0, static=True)
    lr = opt.param_groups[0]["lr"]
    saved = make_optimizer(model, 0.05, 0.9, 0.0, static=False).state_dict()
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.05  # torch puts back the float
    tensor_lr(opt)
    rebuilt = opt.param_groups[0]["lr"]
    assert isinstance(rebuilt, torch.Tensor) and rebuilt.dim() == 0 and float(rebuilt) == pytest.approx(0.05)
    tensor_lr(opt)  # a tensor rate stays the same tensor (a captured step holds it)
    assert opt.param_groups[0]["lr"] is rebuilt and rebuilt is not lr


def _cfg(out, **kw):
    kw = {"epochs": 2, **kw}
    return TrainConfig(data="digits", model="cnn-digits", method="dnq", batch_size=64, out=str(out),
                       act_sampler="fresh", **kw)


def test_a_capture_asked_for_on_the_cpu_says_why_in_one_line_and_trains_eagerly(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(tmp_path / "run", epochs=1, cuda_graph=True), quiet=True)
    msgs = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert msgs == ["the training step is not captured in a CUDA graph: CUDA graphs need a CUDA device; it runs "
                    "eagerly"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    n = cfg["splits"]["train"]
    assert cfg["cuda_graph"] is True and cfg["step"]["mode"] == "eager"
    assert cfg["step"]["not_captured_because"] == "CUDA graphs need a CUDA device"
    assert cfg["step"]["dropped_last_batch"] == n % 64 and cfg["step"]["steps_per_epoch"] == n // 64
    with warnings.catch_warnings(record=True) as caught:  # unset on the CPU: nothing to say
        warnings.simplefilter("always")
        train(_cfg(tmp_path / "quiet", epochs=1), quiet=True)
    assert not [w for w in caught if "CUDA graph" in str(w.message)]


def test_the_trainer_with_the_static_step_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The trainer in the capturable form (what a GPU captures; here run eagerly): two epochs in
    one go equal one epoch, an interruption, and a resumption (the tensor learning rate is rebuilt
    from the checkpoint), and config.json names the form."""
    monkeypatch.setattr(_Run, "_step_mode", lambda self, world: ("static", None))
    whole = train(_cfg(tmp_path / "whole"), quiet=True)
    real = train_mod.train_one_epoch

    def interrupted(*a, epoch, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(*a, epoch=epoch, **k)

    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "split"), quiet=True)
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    assert (tmp_path / "split" / "checkpoint.pt").is_file() and not (tmp_path / "split" / "model.pt").exists()
    resumed = train(_cfg(tmp_path / "split"), resume=True, quiet=True)
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole["test_acc"] == resumed["test_acc"] > 0.5
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert cfg["step"]["mode"] == "static" and cfg["step"]["optimizer"].startswith("SGD, fused")
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert isinstance(lines[0]["lr"], float)


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass


def test_a_failed_capture_says_why_in_one_line_and_the_steps_run_eagerly(monkeypatch):
    """The graph mode's control flow on the CPU, with the CUDA stream API faked and a capture that
    fails: three warm-up steps on the side stream, then the failed capture runs its step eagerly,
    warns once, and every later step runs in the static form: the weights are the static run's."""
    model, method, step, sched, loader = _setup("cpu", "dnq", "static", n=96)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    class FailingGraph:
        registered = []

        def register_generator_state(self, gen):
            self.registered.append(gen)

    def failing_capture(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    step.mode = "graph"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w_graph = _epochs(model, method, step, sched, loader)
    msgs = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert msgs == ["the training step is not captured in a CUDA graph: the capture failed (RuntimeError: operation "
                    "not permitted when stream is capturing); it runs eagerly"]
    assert step.mode == "static" and step.captures == 0 and step.eager_steps == 12
    assert step.summary()["not_captured_because"].startswith("the capture failed")
    gens = FailingGraph.registered
    assert len(gens) == 3 and loader.generator in gens and all(g in gens for g in method.generators())
    ref = _setup("cpu", "dnq", "static", n=96)
    assert torch.equal(w_graph, _epochs(*ref[:4], ref[4]))


# -- CUDA only: a replayed graph is the eager step ------------------------------------------------
@pytest.mark.parametrize("method_name", CHECKED)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_replayed_graph_gives_the_static_steps_weights_bit_for_bit(method_name):
    """With deterministic algorithms, two epochs of replayed graphs (one capture, recaptured only
    when lambda switches the noise's branches) leave exactly the weights of the same steps run
    eagerly in the static form."""
    with _deterministic():
        runs = {}
        for mode in ("static", "graph"):
            model, method, step, sched, loader = _setup("cuda", method_name, mode)
            runs[mode] = (_epochs(model, method, step, sched, loader), step.losses.clone(), step)
    (w_s, l_s, _), (w_g, l_g, g) = runs["static"], runs["graph"]
    assert torch.equal(l_s, l_g)
    assert torch.equal(w_s, w_g)
    steps = 2 * len(l_g)
    assert g.captures == 1 and g.eager_steps == 3 and g.replays == steps - 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_change_of_the_steps_branches_captures_again():
    """lambda 0 -> 1 switches the noise on: epoch 0 is 3 warm-up steps, a capture and 3 replays; at
    epoch 1 the key changes: one eager step, then a new capture and 5 replays."""
    model, method, step, sched, loader = _setup("cuda", "dnq", "graph", n=96)  # 6 steps an epoch
    _epochs(model, method, step, sched, loader, epochs=2, lams=(0.0, 1.0))
    assert step.captures == 2 and step.eager_steps == 3 + 1 and step.replays == 3 + 5
    assert torch.isfinite(step.losses).all()
