"""Optimizers (core.options.optimizers): AdamW, Adam, SGD with momentum, Adagrad, and Lion, Prodigy and
8-bit AdamW from packages sdtrain never installs (here: fake modules in sys.modules wrapping torch
optimizers). Each one trains only the embedding or hypernetwork, writes its name, settings and state to
the `.optim` (where the stock host does not trip over a state it cannot load), continues from a resume
point bit-identically and from the `.optim` with the saved state; a missing package, a bad setting or
another optimizer's state are refused or ignored by name."""

from __future__ import annotations

import copy
import math
import os
import sys
import types

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.formats.embedding_io import SDTRAIN_STATE_KEY, load_embedding, load_optim
from lib_sdtrain.core.formats.torchfile import load_torch_file, pickle_globals
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork, load_hypernetwork_optim
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.options.optimizers import OPTIMIZERS, OptimizerChoice, available_optimizers
from lib_sdtrain.core.tasks import hypernetwork as hn_task
from lib_sdtrain.core.tasks import textual_inversion as ti_task
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.core.training.optimizer_state import restore_optimizer
from lib_sdtrain.core.training.resume import fingerprint
from lib_sdtrain.hosts.standalone.host import StandaloneHost

# A1111 v1.10 modules/safe.py (RestrictedUnpickler.find_class): the globals a file the host opens may hold.
HOST_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                "builtins.set", "__builtin__.set"} | {
    f"torch.{n}" for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                           "ByteStorage", "float32", "BFloat16Storage")}
OPTIONAL = {"Lion": ("lion_pytorch", "lion-pytorch"), "Prodigy": ("prodigyopt", "prodigyopt"),
            "AdamW8bit": ("bitsandbytes", "bitsandbytes")}


# --- stand-ins for the optional packages ---------------------------------------------------------------
class FakeLion(torch.optim.Optimizer):
    """lion-pytorch's Lion: the sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class FakeProdigy(torch.optim.AdamW):
    """AdamW with Prodigy's shapes: a step-size estimate `d` in the groups, flat `p0`/`s` state."""

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
        for group in self.param_groups:
            group.update(d=1.0, k=0)

    def step(self, closure=None):
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group["d"]  # the step size: the learning rate times the estimate
        super().step(closure)
        with torch.no_grad():
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if "p0" not in state:
                        state["p0"], state["s"] = p.detach().flatten().clone(), torch.zeros(p.numel())
                    state["s"].mul_(0.5).add_(p.grad.flatten().abs())
                d = 1.0 + sum(float(self.state[p]["s"].mean()) for p in group["params"] if "s" in self.state[p])
                group["d"], group["k"] = max(group["d"], d), group["k"] + 1


class FakeAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit shapes: moments state1/state2 shaped like the parameter, blockwise
    absmax and a 256-entry quantization map beside them (the moments are rounded through them)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, state1=torch.zeros_like(p), state2=torch.zeros_like(p),
                                 qmap1=torch.linspace(-1, 1, 256), absmax1=torch.zeros(math.ceil(p.numel() / 64)))
                state["step"] += 1
                m, v = state["state1"], state["state2"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                flat = torch.nn.functional.pad(m.flatten(), (0, state["absmax1"].numel() * 64 - m.numel()))
                state["absmax1"] = flat.view(-1, 64).abs().amax(1).clamp_min(1e-12)
                scale = state["absmax1"].repeat_interleave(64)[: m.numel()].view_as(m)
                idx = torch.bucketize((m / scale).clamp(-1, 1), state["qmap1"]).clamp(max=255)
                m.copy_(state["qmap1"][idx] * scale)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                p.addcdiv_(m / bc1, (v / bc2).sqrt().add_(group["eps"]), value=-group["lr"])


@pytest.fixture
def fake_packages(monkeypatch):
    """lion_pytorch, prodigyopt and bitsandbytes.optim as importable modules for this test."""
    for name, attrs in (("lion_pytorch", {"Lion": FakeLion}), ("prodigyopt", {"Prodigy": FakeProdigy}),
                        ("bitsandbytes", {}), ("bitsandbytes.optim", {"AdamW8bit": FakeAdamW8bit})):
        module = types.ModuleType(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules["bitsandbytes"], "optim", sys.modules["bitsandbytes.optim"], raising=False)


@pytest.fixture
def no_packages(monkeypatch):
    for module in ("lion_pytorch", "prodigyopt", "bitsandbytes", "bitsandbytes.optim"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails: as if not installed


# --- jobs ------------------------------------------------------------------------------------------------
def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def new_workspace(host, root, kind, data):
    if kind == "ti":
        folder = root / "embeddings"
        create_embedding(host, CreateEmbeddingConfig.from_dict(
            {"name": "vec", "num_vectors_per_token": 2, "init_text": "shape", "embeddings_dir": str(folder)}))
        return {"embedding_name": "vec", "embeddings_dir": str(folder), "template_filename": "subject_filewords.txt",
                "learn_rate": "0.02", "save_embedding_every": 0, **_common(data)}
    folder = root / "hypernetworks"
    create_hypernetwork(None, CreateHypernetworkConfig.from_dict({
        "name": "net", "enable_sizes": [64, 32], "use_dropout": True, "dropout_structure": "0, 0.3, 0",
        "hypernetwork_dir": str(folder), "seed": 0}))
    return {"hypernetwork_name": "net", "hypernetwork_dir": str(folder), "learn_rate": "0.002",
            "save_hypernetwork_every": 0, **_common(data)}


def _common(data):
    return {"data_root": str(data), "log_directory": "", "training_width": 64,
            "training_height": 64, "steps": 4, "batch_size": 2, "create_image_every": 0, "seed": 3, "flip_p": 0.5,
            "resume_point_minutes": 0, "training_write_csv_every": 0, "save_training_settings_to_txt": False}


def train(host, kind, job, control=None):
    torch.manual_seed(0)  # dropout draws from the global generator: the same start for every run
    if kind == "ti":
        return train_embedding(host, TrainEmbeddingConfig.from_dict(job), control)
    return train_hypernetwork(host, TrainHypernetworkConfig.from_dict(job), control)


def out_file(kind, job):
    if kind == "ti":
        return os.path.join(job["embeddings_dir"], "vec.pt")
    return os.path.join(job["hypernetwork_dir"], "net.pt")


def trained(kind, path):
    if kind == "ti":
        return [load_embedding(path).vectors["*"]]
    return [p.detach().clone() for p in load_hypernetwork(path).trainable_params()]


def optim_of(kind, path):
    if kind == "ti":
        return load_optim(path, load_embedding(path).checksum())
    return load_hypernetwork_optim(path)


def state_tensors(state_dict):
    return {(i, k): v for i, entry in state_dict["state"].items() for k, v in entry.items()
            if isinstance(v, torch.Tensor)}


@pytest.fixture
def host(tiny_sd1):
    return StandaloneHost(tiny_sd1)


@pytest.mark.parametrize("kind", ["ti", "hn"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_only_its_tensors_saves_its_state_and_resumes(
    name, kind, host, tiny_sd1, fake_packages, tmp_path, monkeypatch
):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    settings = {"optimizer_name": name, "weight_decay": 0.01, "momentum": 0.8}
    if name == "Lion":
        settings["betas"] = "0.95, 0.98"
    ref = {**new_workspace(host, tmp_path / "ref", kind, data), **settings}
    run = {**new_workspace(host, tmp_path / "run", kind, data), **settings}
    start, model_before = trained(kind, out_file(kind, ref)), model_state(tiny_sd1)

    train(host, kind, ref)  # uninterrupted
    first = train(host, kind, run, Recorder(stop_at=2))
    assert first.stopped and first.step == 2 and os.path.isfile(out_file(kind, run) + ".resume")
    rec = Recorder()
    second = train(host, kind, run, rec)
    assert second.step == 4 and any(e["text"].startswith("resumed from step 2") for e in rec.of("log"))

    # the same tensors as without the stop, and only they moved
    expected, got = trained(kind, out_file(kind, ref)), trained(kind, out_file(kind, run))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert any(not torch.equal(a, b) for a, b in zip(start, got))
    model_after = model_state(tiny_sd1)
    assert all(torch.equal(model_before[k], model_after[k]) for k in model_before)

    # the .optim names the optimizer, its settings and holds its state...
    path = out_file(kind, run)
    saved = optim_of(kind, path)
    assert saved["optimizer_name"] == name
    assert saved["optimizer_settings"]["weight_decay"] == 0.01
    assert saved["optimizer_settings"].get("momentum", 0.8) == 0.8
    if name == "Lion":
        assert saved["optimizer_settings"]["betas"] == [0.95, 0.98]
    n_params = len(expected)
    assert len(saved["optimizer_state_dict"]["state"]) == n_params
    # ...where the stock host takes it only into the optimizer it builds (TI: AdamW; HN: torch.optim's by name)
    raw = load_torch_file(path + ".optim")
    host_builds = name == "AdamW" if kind == "ti" else name in ("AdamW", "Adam", "SGD", "Adagrad")
    assert ("optimizer_state_dict" in raw) == host_builds and (SDTRAIN_STATE_KEY in raw) != host_builds
    assert set(pickle_globals(path + ".optim")) <= HOST_GLOBALS
    if host_builds:  # the host's way: its optimizer with the learning rate only, then the saved state
        params = [torch.nn.Parameter(t.clone()) for t in expected]
        cls = getattr(torch.optim, name)
        opt = cls(params, lr=0.01, weight_decay=0.0) if kind == "ti" else cls(params, lr=0.01)
        opt.load_state_dict(raw["optimizer_state_dict"])
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)

    # a later job from the file and its .optim (no resume point: the run ended) starts with that state
    loaded = {}
    module = ti_task if kind == "ti" else hn_task

    def spy(optimizer, state, keep=()):
        why = restore_optimizer(optimizer, state, keep)
        loaded["state"] = copy.deepcopy(optimizer.state_dict())
        return why

    monkeypatch.setattr(module, "restore_optimizer", spy)
    rec = Recorder()
    assert train(host, kind, {**run, "steps": 5}, rec).step == 5
    assert any(e["text"].startswith("resumed optimizer state from") for e in rec.of("log"))
    want, have = state_tensors(saved["optimizer_state_dict"]), state_tensors(loaded["state"])
    assert want and want.keys() == have.keys() and all(torch.equal(want[k], have[k].cpu()) for k in want)
    if name == "Prodigy":  # state the optimizer keeps in its groups comes back too
        assert loaded["state"]["param_groups"][0]["d"] == saved["optimizer_state_dict"]["param_groups"][0]["d"] > 1


def test_another_optimizer_starts_afresh_and_names_both(host, tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    job = new_workspace(host, tmp_path, "ti", data)
    path = out_file("ti", job)
    train(host, "ti", job)
    raw = load_torch_file(path + ".optim")
    assert raw["optimizer_name"] == "AdamW" and "optimizer_state_dict" in raw  # the host's AdamW takes it
    rec = Recorder()
    train(host, "ti", {**job, "steps": 6, "optimizer_name": "SGD"}, rec)
    logs = [e["text"] for e in rec.of("log")]
    assert any("it holds AdamW state and this run uses SGD; starting SGD afresh" in t for t in logs), logs
    assert not any(t.startswith("resumed optimizer state") for t in logs)
    saved = optim_of("ti", path)
    assert saved["optimizer_name"] == "SGD" and "momentum_buffer" in saved["optimizer_state_dict"]["state"][0]
    assert "optimizer_state_dict" not in load_torch_file(path + ".optim")  # the host's AdamW would choke on it
    # a host-written .optim names no optimizer: it is AdamW's, and an SGD run does not take it either
    torch.save({"hash": load_embedding(path).checksum(), "optimizer_state_dict": raw["optimizer_state_dict"]},
               path + ".optim")
    rec = Recorder()
    train(host, "ti", {**job, "steps": 7, "optimizer_name": "SGD"}, rec)
    assert any("it holds AdamW state and this run uses SGD" in e["text"] for e in rec.of("log"))


def test_a_continued_run_uses_its_own_settings_and_keeps_the_saved_state():
    p = torch.nn.Parameter(torch.randn(3, 4))
    old = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0, betas=(0.5, 0.6))
    p.grad = torch.ones_like(p)
    old.step()
    new = OptimizerChoice("AdamW", weight_decay=0.2).build([torch.nn.Parameter(torch.zeros(3, 4))], 0.1)
    assert restore_optimizer(new, old.state_dict(), keep=OptimizerChoice("AdamW", weight_decay=0.2).kwargs()) is None
    group = new.param_groups[0]
    assert group["weight_decay"] == 0.2 and group["betas"] == (0.5, 0.6)  # betas not set: the saved ones
    assert torch.equal(next(iter(new.state.values()))["exp_avg"], old.state[p]["exp_avg"])


def test_state_shapes_are_checked_where_the_optimizer_keeps_them_shaped(fake_packages):
    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = FakeProdigy([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    assert saved["state"][0]["p0"].shape == (32,)  # flat: accepted
    assert restore_optimizer(FakeProdigy([torch.nn.Parameter(torch.zeros(4, 8))]), saved) is None
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg"] = torch.zeros(32)
    assert "'exp_avg' for parameter 0 has shape (32,)" in restore_optimizer(
        FakeProdigy([torch.nn.Parameter(torch.zeros(4, 8))]), bad)
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg"] = torch.zeros(32)
    assert "shape" in restore_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 8))]), bad)


def test_defaults_are_the_hosts(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    ti = TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(tmp_path)})
    hn = TrainHypernetworkConfig.from_dict({"hypernetwork_name": "h", "data_root": str(tmp_path)})
    assert (ti.optimizer_name, ti.weight_decay, ti.betas) == ("AdamW", 0.0, "")
    assert (hn.optimizer_name, hn.weight_decay, hn.betas) == ("AdamW", 0.01, "")
    p = [torch.nn.Parameter(torch.zeros(2, 3))]
    # the host's: TI AdamW(lr, weight_decay=0.0); HN optimizer_dict["AdamW"](params, lr=lr)
    assert ti.optimizer_choice().build(p, 0.005).state_dict() == torch.optim.AdamW(
        p, lr=0.005, weight_decay=0.0).state_dict()
    assert hn.optimizer_choice().build(p, 1e-5).state_dict() == torch.optim.AdamW(p, lr=1e-5).state_dict()
    sgd = TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(tmp_path), "optimizer_name": "SGD"})
    assert sgd.optimizer_choice().build(p, 0.1).param_groups[0]["momentum"] == 0.9
    fields = {f["name"]: f for f in TrainEmbeddingConfig.describe()}
    assert fields["optimizer_name"]["choices"] == OPTIMIZERS and fields["optimizer_name"]["label"] == "Optimizer"
    # the resume point is made with its optimizer and settings
    assert len({fingerprint(ti), fingerprint(sgd), fingerprint(TrainEmbeddingConfig.from_dict(
        {"embedding_name": "e", "data_root": str(tmp_path), "weight_decay": 0.1}))}) == 3


@pytest.mark.parametrize(("field", "value", "says"), [
    ("optimizer_name", "LBFGS", "must be one of"),
    ("weight_decay", -0.1, "0 or more"),
    ("momentum", 1.0, "[0, 1)"),
    ("betas", "0.9", "two numbers"),
    ("betas", "0.9, x", "two numbers"),
    ("betas", "0.9, 1.5", "[0, 1)"),
])
def test_bad_settings_name_their_field(tmp_path, field, value, says):
    (tmp_path / "a.png").write_bytes(b"x")
    for cls, name in ((TrainEmbeddingConfig, "embedding_name"), (TrainHypernetworkConfig, "hypernetwork_name")):
        with pytest.raises(ConfigError) as e:
            cls.from_dict({name: "x", "data_root": str(tmp_path), field: value})
        assert e.value.field == field and says in e.value.message


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_a_missing_package_is_a_field_error_saying_what_to_install(name, tmp_path, no_packages):
    (tmp_path / "a.png").write_bytes(b"x")
    package = OPTIONAL[name][1]
    with pytest.raises(ConfigError) as e:
        TrainEmbeddingConfig.from_dict({"embedding_name": "x", "data_root": str(tmp_path), "optimizer_name": name})
    assert e.value.field == "optimizer_name"
    assert f"pip install {package}" in e.value.message and "webui" in e.value.message
    available = available_optimizers()
    assert available[name] == e.value.message
    assert all(available[n] is None for n in ("AdamW", "Adam", "SGD", "Adagrad"))


def test_available_optimizers_lists_installed_packages(fake_packages):
    assert available_optimizers() == dict.fromkeys(OPTIMIZERS)
