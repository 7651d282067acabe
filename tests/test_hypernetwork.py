"""Hypernetworks: the host's module structure and .pt layout, generic attach, training on the tiny model."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import zipfile
from collections import OrderedDict

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError, FormatError, SdtrainError
from lib_sdtrain.core.formats.torchfile import load_torch_file, pickle_globals
from lib_sdtrain.core.hypernetwork.attach import attach_hypernetworks, attention_modules
from lib_sdtrain.core.hypernetwork.network import (
    ACTIVATIONS,
    UI_ACTIVATIONS,
    Hypernetwork,
    HypernetworkModule,
    find_hypernetwork_file,
    hypernetwork_hash,
    load_hypernetwork,
    load_hypernetwork_optim,
    save_hypernetwork,
)
from lib_sdtrain.core.options.config import (
    HN_ACTIVATIONS,
    CreateHypernetworkConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.registry import job_config_types, job_runners
from lib_sdtrain.hosts.standalone.host import StandaloneHost

# A1111 v1.10 modules/safe.py: zip entries and unpickler globals its check lets through.
HOST_ZIP_RE = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
HOST_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
#: Hypernetwork.save's metadata keys, in its order.
HOST_META_KEYS = [
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
]


# --- the structure rules, written out independently of the implementation --------------------------


def expected_dropout(n: int, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    if not use_dropout:
        return [0] * n
    return [0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0] + [0]


def expected_state(dim, structure, activation, layer_norm, dropout, activate_output):
    """Key → shape of one module's state dict: Sequential indices advance past every activation,
    LayerNorm and Dropout; only Linear and LayerNorm hold tensors."""
    keys, idx = {}, 0
    n = len(structure)
    for i in range(n - 1):
        d_in, d_out = int(dim * structure[i]), int(dim * structure[i + 1])
        keys[f"linear.{idx}.weight"], keys[f"linear.{idx}.bias"] = (d_out, d_in), (d_out,)
        idx += 1
        if activation not in ("linear", None) and (i < n - 2 or activate_output):
            idx += 1
        if layer_norm:
            keys[f"linear.{idx}.weight"], keys[f"linear.{idx}.bias"] = (d_out,), (d_out,)
            idx += 1
        if dropout[i + 1] > 0:
            idx += 1
    return keys


GRID = list(
    itertools.product(
        ["linear", "relu", "swish", "gelu", "elu"],
        [False, True],  # layer norm
        [(False, False), (True, True), (True, False)],  # (use_dropout, last_layer_dropout)
        [[1, 2, 1], [1, 1.5, 0.5, 1]],
    )
)


@pytest.mark.parametrize(("activation", "layer_norm", "dropout", "structure"), GRID)
def test_file_has_the_host_layout_and_round_trips(tmp_path, activation, layer_norm, dropout, structure):
    use_dropout, last_layer_dropout = dropout
    sizes = [64, 40]
    hn = Hypernetwork(
        "grid",
        sizes,
        structure,
        activation,
        "XavierNormal",
        layer_norm,
        use_dropout,
        last_layer_dropout=last_layer_dropout,
        seed=1,
    )
    hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name = 7, "abcdef0123", "model"
    ds = expected_dropout(len(structure), use_dropout, last_layer_dropout)
    assert hn.dropout_structure == ds
    path = save_hypernetwork(hn, tmp_path / "grid.pt")

    # what the host's loader reads: int widths, then Hypernetwork.save's keys in its order
    raw = load_torch_file(path)
    assert list(raw) == [*sizes, *HOST_META_KEYS]
    assert raw["layer_structure"] == structure and raw["activation_func"] == activation
    assert (raw["is_layer_norm"], raw["use_dropout"], raw["activate_output"]) == (
        layer_norm,
        use_dropout,
        False,
    )
    assert raw["dropout_structure"] == ds and raw["last_layer_dropout"] == (ds[-2] != 0)
    assert (raw["step"], raw["name"], raw["weight_initialization"]) == (7, "grid", "XavierNormal")
    for dim in sizes:
        want = expected_state(dim, structure, activation, layer_norm, ds, activate_output=False)
        for state in raw[dim]:
            assert isinstance(state, OrderedDict)
            assert {k: tuple(v.shape) for k, v in state.items()} == want
            assert all(v.dtype == torch.float32 for v in state.values())
    # ...and the host's safe-check accepts the file
    with zipfile.ZipFile(path) as z:
        assert all(HOST_ZIP_RE.match(n) for n in z.namelist())
    assert set(pickle_globals(path)) <= HOST_GLOBALS

    back = load_hypernetwork(path)
    assert sorted(back.layers) == sorted(sizes)
    for dim in sizes:
        for a, b in zip(hn.layers[dim], back.layers[dim]):
            sa, sb = a.state_dict(), b.state_dict()
            assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
            assert [type(m) for m in a.linear] == [type(m) for m in b.linear]
    fields = (
        "name",
        "step",
        "layer_structure",
        "activation_func",
        "weight_init",
        "add_layer_norm",
        "use_dropout",
        "activate_output",
        "dropout_structure",
        "sd_checkpoint",
        "sd_checkpoint_name",
    )
    assert {f: getattr(back, f) for f in fields} == {f: getattr(hn, f) for f in fields}
    assert back.optimizer_name == "AdamW" and not back.training
    assert all(not p.requires_grad for p in back.trainable_params())


def test_module_semantics():
    torch.manual_seed(0)
    m = HypernetworkModule(8, None, [1, 2, 1], "swish", "KaimingNormal", activate_output=True)
    assert isinstance(m.linear[1], torch.nn.Hardswish)  # the host's "swish", not SiLU
    assert isinstance(m.linear[3], torch.nn.Hardswish)  # activate_output
    x = torch.randn(2, 3, 8)
    m.eval()
    m.multiplier = 0.5
    assert torch.allclose(m(x), x + m.linear(x) * 0.5)
    m.train()  # multiplier ignored while training
    assert torch.allclose(m(x), x + m.linear(x))
    normal = HypernetworkModule(8, None, [1, 2, 1], "relu", "Normal", add_layer_norm=True)
    for layer in normal.linear:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):  # LayerNorm gets N(0, 0.01) too
            assert torch.count_nonzero(layer.bias) == 0 and 0 < layer.weight.std() < 0.02
    for bad in ([2, 2, 1], [1, 2, 2], [1]):
        with pytest.raises(ConfigError, match=r"start and end with 1|at least two") as e:
            HypernetworkModule(8, None, bad, "linear")
        assert e.value.field == "layer_structure"


def test_activation_table_matches_the_host_and_the_ui_list():
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish and ACTIVATIONS["linear"] is torch.nn.Identity
    assert ACTIVATIONS["gelu"] is torch.nn.GELU and ACTIVATIONS["leakyrelu"] is torch.nn.LeakyReLU
    assert tuple(HN_ACTIVATIONS) == UI_ACTIVATIONS  # the config's fixed list = torch's, here


def test_seed_makes_creation_reproducible_without_touching_the_global_rng():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = Hypernetwork("a", [16], [1, 2, 1], "relu", "XavierUniform", seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = Hypernetwork("b", [16], [1, 2, 1], "relu", "XavierUniform", seed=3)
    assert torch.equal(a.layers[16][0].linear[0].weight, b.layers[16][0].linear[0].weight)


# --- files as the host writes them --------------------------------------------------------------------


def host_state(dim, *, relu_output=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    sd["linear.0.weight"] = torch.randn(2 * dim, dim, generator=g)
    sd["linear.0.bias"] = torch.randn(2 * dim, generator=g)
    sd["linear.2.weight"] = torch.randn(dim, 2 * dim, generator=g)
    sd["linear.2.bias"] = torch.randn(dim, generator=g)
    return sd


def test_a_host_written_file_loads(tmp_path):
    # a dict shaped as Hypernetwork.save makes it, written with plain torch.save like the host
    k, v = host_state(16, seed=1), host_state(16, seed=2)
    data = {
        16: (k, v),
        "step": 120,
        "name": "stored",
        "layer_structure": [1.0, 2.0, 1.0],
        "activation_func": "relu",
        "is_layer_norm": False,
        "weight_initialization": "Normal",
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "v1-5",
        "activate_output": False,
        "use_dropout": False,
        "dropout_structure": [0, 0, 0],
        "last_layer_dropout": False,
        "optional_info": None,
    }
    path = tmp_path / "renamed.pt"
    torch.save(data, path)
    hn = load_hypernetwork(path)
    assert (hn.name, hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name) == (
        "stored",
        120,
        "0123456789",
        "v1-5",
    )
    hk = hn.layers[16][0]
    assert torch.equal(hk.linear[0].weight, k["linear.0.weight"]) and torch.equal(
        hk.linear[2].bias, k["linear.2.bias"]
    )
    x = torch.randn(1, 3, 16)
    h = (
        torch.relu(x @ k["linear.0.weight"].T + k["linear.0.bias"]) @ k["linear.2.weight"].T
        + k["linear.2.bias"]
    )
    assert torch.allclose(hk(x), x + h, atol=1e-5)


def test_old_files_get_the_host_defaults(tmp_path):
    # an early file: linear1/linear2 keys, no metadata → [1, 2, 1], no activation
    g = torch.Generator().manual_seed(0)
    old = {
        "linear1.weight": torch.randn(32, 16, generator=g),
        "linear1.bias": torch.zeros(32),
        "linear2.weight": torch.randn(16, 32, generator=g),
        "linear2.bias": torch.zeros(16),
    }
    torch.save({16: (old, dict(old))}, tmp_path / "old.pt")
    hn = load_hypernetwork(tmp_path / "old.pt")
    assert (hn.name, hn.step, hn.layer_structure, hn.activation_func) == ("old", 0, [1, 2, 1], None)
    assert torch.equal(hn.layers[16][0].linear[1].weight, old["linear2.weight"])
    # no 'activate_output' key means True: with relu the output layer is activated too
    torch.save({16: (host_state(16), host_state(16)), "activation_func": "relu"}, tmp_path / "act.pt")
    hn = load_hypernetwork(tmp_path / "act.pt")
    assert hn.activate_output is True and [type(m).__name__ for m in hn.layers[16][0].linear] == [
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
    ]
    # no dropout structure: derived from use_dropout with last_layer_dropout False
    torch.save({16: (old, dict(old)), "use_dropout": True}, tmp_path / "drop.pt")
    assert load_hypernetwork(tmp_path / "drop.pt").dropout_structure == [0, 0, 0]


def test_broken_and_malicious_files_are_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch '{tmp_path / 'pwned'}'",))

    torch.save({64: (Exploit(), {}), "name": "evil"}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="refused"):
        load_hypernetwork(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}}, tmp_path / "emb.pt")
    with pytest.raises(FormatError, match="not a hypernetwork"):
        load_hypernetwork(tmp_path / "emb.pt")
    torch.save({16: (host_state(16), host_state(16)), "layer_structure": [1, 3, 1]}, tmp_path / "shape.pt")
    with pytest.raises(FormatError, match="does not match"):
        load_hypernetwork(tmp_path / "shape.pt")
    torch.save({16: (host_state(16), host_state(16)), "layer_structure": [2, 1]}, tmp_path / "ls.pt")
    with pytest.raises(FormatError, match="start and end with 1"):
        load_hypernetwork(tmp_path / "ls.pt")
    # an unsafe sidecar costs only the optimizer state
    good = save_hypernetwork(Hypernetwork("g", [8], [1, 2, 1], "linear", "Normal"), tmp_path / "g.pt")
    torch.save({"hash": hypernetwork_hash(good), "optimizer_state_dict": Exploit()}, good + ".optim")
    assert load_hypernetwork(good).optimizer_name == "AdamW"
    assert not (tmp_path / "pwned").exists()


def test_optim_sidecar_is_paired_by_the_file_sha256(tmp_path):
    path = save_hypernetwork(Hypernetwork("o", [8], [1, 2, 1], "linear", "Normal", seed=0), tmp_path / "o.pt")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:10]
    assert hypernetwork_hash(path) == digest
    from lib_sdtrain.core.hypernetwork.network import save_hypernetwork_optim

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    save_hypernetwork_optim(path, opt.state_dict(), "SGD")
    saved = load_torch_file(path + ".optim")
    assert set(saved) == {"hash", "optimizer_state_dict", "optimizer_name"} and saved["hash"] == digest
    assert load_hypernetwork(path).optimizer_name == "SGD"
    save_hypernetwork(Hypernetwork("o", [8], [1, 2, 1], "linear", "Normal", seed=1), path)  # file changed
    assert load_hypernetwork_optim(path) is None and load_hypernetwork(path).optimizer_name == "AdamW"


def test_find_hypernetwork_file_lists_like_the_host(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ("a.pt", "sub/a.pt", "Sub2.pt", ".hidden/b.pt", "None.pt", "c.PT"):
        (tmp_path / rel).write_bytes(b"x")
    assert find_hypernetwork_file(str(tmp_path), "a") == str(tmp_path / "sub" / "a.pt")  # last one wins
    assert find_hypernetwork_file(str(tmp_path), "Sub2") == str(tmp_path / "Sub2.pt")
    for missing in ("b", "None", "c"):
        assert find_hypernetwork_file(str(tmp_path), missing) is None


# --- attach ----------------------------------------------------------------------------------------------


def _predict_inputs(host, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    cond = host.encode_text(["a photo of a cat", "a red square"])
    return x, t, cond


def _hn(name, sizes, activation="relu", seed=0):
    return Hypernetwork(name, sizes, [1, 2, 1], activation, "XavierNormal", seed=seed)


def test_multiplier_zero_equals_no_hypernetwork_and_detaching_restores_the_model(tiny_sd1):
    host = StandaloneHost(tiny_sd1)
    x, t, cond = _predict_inputs(host)
    with torch.no_grad():
        plain = host.predict(x, t, cond)
        hn = _hn("m", [64, 32])
        with host.use_hypernetwork([hn]):
            changed = host.predict(x, t, cond)
            hn.set_multiplier(0.0)
            zero = host.predict(x, t, cond)
        after = host.predict(x, t, cond)
    assert (changed - plain).abs().max() > 1e-3
    assert torch.equal(zero, plain)
    assert torch.equal(after, plain)
    assert all(not m._forward_pre_hooks for m in tiny_sd1.modules())


def _host_style_forward(hypernetworks):
    """ldm CrossAttention.forward as the host's unoptimized attention_CrossAttention_forward: the
    context through apply_hypernetworks (K and V chains), then to_k/to_v."""

    def forward(self, x, context=None, mask=None):
        h = self.heads
        q = self.to_q(x)
        context = x if context is None else context
        ck = cv = context
        for hn in hypernetworks:
            layers = hn.layers.get(ck.shape[2])
            if layers is not None:
                ck, cv = layers[0](ck), layers[1](cv)
        k, v = self.to_k(ck), self.to_v(cv)
        b, n, _ = q.shape

        def heads(tensor):
            return (
                tensor.reshape(b, tensor.shape[1], h, -1)
                .permute(0, 2, 1, 3)
                .reshape(b * h, tensor.shape[1], -1)
            )

        q, k, v = heads(q), heads(k), heads(v)
        attn = (torch.einsum("bid,bjd->bij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bij,bjd->bid", attn, v)
        out = out.reshape(b, h, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)

    return forward


@pytest.mark.parametrize("sizes", [[64, 32], [32]])  # [32]: self-attention only (level 1 attn1)
def test_generic_attach_equals_the_host_application(tiny_sd1, monkeypatch, sizes):
    from ldm.modules.attention import CrossAttention

    host = StandaloneHost(tiny_sd1)
    attn = attention_modules(tiny_sd1.model.diffusion_model)
    assert len(attn) == 14 and all(isinstance(m, CrossAttention) for m in attn)
    x, t, cond = _predict_inputs(host, seed=1)
    # two hypernetworks in a row, the second only for width 64
    hns = [_hn("one", sizes, "relu", seed=1), _hn("two", [64], "tanh", seed=2)]
    with torch.no_grad():
        plain = host.predict(x, t, cond)
        with host.use_hypernetwork(hns):
            ours = host.predict(x, t, cond)
        monkeypatch.setattr(CrossAttention, "forward", _host_style_forward(hns))
        reference = host.predict(x, t, cond)
        monkeypatch.undo()
        again = host.predict(x, t, cond)
    assert (ours - plain).abs().max() > 1e-3
    assert torch.allclose(ours, reference, atol=2e-5, rtol=1e-5)
    assert torch.equal(again, plain)


def test_attach_feeds_gradients_to_the_hypernetwork_only(tiny_sd1):
    host = StandaloneHost(tiny_sd1)
    x, t, cond = _predict_inputs(host)
    hn = _hn("g", [32]).train(True)
    flags = [p.requires_grad for p in tiny_sd1.parameters()]
    from lib_sdtrain.core.port import SessionOptions

    with (
        host.gpu_session("t", SessionOptions()),
        attach_hypernetworks(tiny_sd1.model.diffusion_model, [hn]) as n,
    ):
        assert n == 14
        host.predict(x, t, cond.detach()).square().mean().backward()
        assert all(p.grad is None for p in tiny_sd1.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.trainable_params())
    assert [p.requires_grad for p in tiny_sd1.parameters()] == flags


# --- configs ------------------------------------------------------------------------------------------


def test_create_config_takes_host_requests(tmp_path):
    c = CreateHypernetworkConfig.from_dict(
        {
            "name": "h",
            "enable_sizes": ["768", "320"],
            "layer_structure": [1, 1.5, 1],
            "use_dropout": True,
            "dropout_structure": "0, 0.1, 0",
            "hypernetwork_dir": str(tmp_path),
        }
    )
    assert c.enable_sizes == (768, 320) and c.layer_structure_list() == [1.0, 1.5, 1.0]
    assert c.dropout_structure_list() == [0.0, 0.1, 0.0]
    assert CreateHypernetworkConfig.from_dict(c.to_dict()) == c
    d = CreateHypernetworkConfig.from_dict({"name": "h"})
    assert (d.enable_sizes, d.layer_structure, d.activation_func, d.weight_init) == (
        (768, 320, 640, 1280),
        "1, 2, 1",
        "linear",
        "Normal",
    )
    assert d.dropout_structure_list() == [0, 0, 0]  # dropout off: zeros, as the host


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layer_structure", "2, 2, 1"),
        ("layer_structure", "1, 2"),
        ("layer_structure", "1, x, 1"),
        ("activation_func", "threshold"),
        ("activation_func", "nope"),
        ("weight_init", "Uniform"),
        ("enable_sizes", []),
        ("enable_sizes", ["big"]),
        ("dropout_structure", "0, 1.5, 0"),
        ("dropout_structure", "0, 0.1"),
        ("name", "../x"),
    ],
)
def test_create_config_errors_name_their_field(field, value):
    with pytest.raises(ConfigError) as e:
        CreateHypernetworkConfig.from_dict({"name": "h", "use_dropout": True, field: value})
    assert e.value.field == field


def test_train_config_defaults_and_registration(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    c = TrainHypernetworkConfig.from_dict({"hypernetwork_name": "h", "data_root": str(tmp_path)})
    assert (c.learn_rate, c.template_filename, c.optimizer_name, c.save_hypernetwork_every) == (
        "0.00001",
        "hypernetwork.txt",
        "AdamW",
        500,
    )
    fields = {f["name"] for f in TrainHypernetworkConfig.describe()}
    assert "save_image_with_stored_embedding" not in fields and "preview_sampler_name" in fields
    with pytest.raises(ConfigError) as e:
        TrainHypernetworkConfig.from_dict(
            {"hypernetwork_name": "h", "data_root": str(tmp_path), "optimizer_name": "LBFGS"}
        )
    assert e.value.field == "optimizer_name"
    kinds = {"create_embedding", "train_embedding", "create_hypernetwork", "train_hypernetwork", "preprocess"}
    assert set(job_config_types()) == kinds and set(job_runners()) == kinds


def test_create_hypernetwork(tmp_path):
    cfg = CreateHypernetworkConfig.from_dict(
        {
            "name": "my net!",
            "enable_sizes": [64, 32],
            "activation_func": "relu",
            "use_dropout": True,
            "dropout_structure": "0, 0.2, 0",
            "hypernetwork_dir": str(tmp_path),
            "seed": 0,
        }
    )
    path = create_hypernetwork(None, cfg)
    assert path == str((tmp_path / "my net.pt").resolve())
    hn = load_hypernetwork(path)
    assert (hn.name, hn.step, hn.dropout_structure, hn.use_dropout) == ("my net", 0, [0.0, 0.2, 0.0], True)
    assert [type(m).__name__ for m in hn.layers[64][0].linear] == ["Linear", "ReLU", "Dropout", "Linear"]
    with pytest.raises(SdtrainError, match="already exists"):
        create_hypernetwork(None, cfg)
    glu = CreateHypernetworkConfig.from_dict(
        {"name": "g", "activation_func": "glu", "hypernetwork_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError) as e:
        create_hypernetwork(None, glu)
    assert e.value.field == "activation_func" and not (tmp_path / "g.pt").exists()


# --- training on the tiny model -----------------------------------------------------------------------




@pytest.fixture
def workspace(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    ws = {"data": str(data), "hn": str(tmp_path / "hypernetworks"), "log": str(tmp_path / "log")}
    create_hypernetwork(
        None,
        CreateHypernetworkConfig.from_dict(
            {
                "name": "hyper",
                "enable_sizes": [64, 32],
                "activation_func": "relu",
                "add_layer_norm": False,
                "hypernetwork_dir": ws["hn"],
                "seed": 0,
            }
        ),
    )
    return ws


def train_cfg(ws, **kw):
    base = {
        "hypernetwork_name": "hyper",
        "hypernetwork_dir": ws["hn"],
        "data_root": ws["data"],
        "log_directory": ws["log"],
        "training_width": 64,
        "training_height": 64,
        "steps": 12,
        "learn_rate": "0.002",
        "batch_size": 2,
        "save_hypernetwork_every": 0,
        "create_image_every": 0,
        "training_write_csv_every": 1,
        "seed": 3,
        "preview_steps": 3,
    }
    base.update(kw)
    return TrainHypernetworkConfig.from_dict(base)


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def test_training_learns_writes_host_files_and_leaves_the_model_untouched(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    before, flags = model_state(tiny_sd1)
    path = os.path.join(workspace["hn"], "hyper.pt")
    start = load_hypernetwork(path)
    rec = Recorder()
    cfg = train_cfg(
        workspace, steps=30, save_hypernetwork_every=15, create_image_every=15, validation_every=30
    )
    result = train_hypernetwork(host, cfg, rec)

    val = rec.of("validation")
    assert [v["step"] for v in val] == [0, 30]
    assert val[1]["loss"] < val[0]["loss"]
    after, flags_after = model_state(tiny_sd1)
    assert flags_after == flags and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_pre_hooks for m in tiny_sd1.modules())

    assert result.file == path and result.kind == "hypernetwork" and "Hypernetwork saved to" in result.message
    final = load_hypernetwork(path)
    assert (final.step, final.name) == (30, "hyper")
    assert not torch.equal(final.layers[64][0].linear[0].weight, start.layers[64][0].linear[0].weight)
    assert final.optimizer_name == "AdamW" and load_hypernetwork_optim(path) is not None
    log_dir = result.log_dir
    for rel in (
        "hypernetworks/hyper-15.pt",
        "hypernetworks/hyper-30.pt",
        "images/hyper-15.png",
        "images/hyper-30.png",
        "hypernetwork_loss.csv",
        "loss.png",
    ):
        assert os.path.isfile(os.path.join(log_dir, rel)), rel
    assert not os.path.exists(os.path.join(log_dir, "image_embeddings"))
    inter = load_hypernetwork(os.path.join(log_dir, "hypernetworks/hyper-15.pt"))
    assert (inter.step, inter.name) == (15, "hyper")  # the base name, as the host's save_hypernetwork
    assert load_hypernetwork_optim(os.path.join(log_dir, "hypernetworks/hyper-15.pt")) is not None
    with open(result.loss_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    settings = [f for f in os.listdir(log_dir) if f.startswith("settings-")]
    with open(os.path.join(log_dir, settings[0])) as fh:
        s = json.load(fh)
    assert s["hypernetwork_name"] == "hyper" and s["layer_structure"] == [1.0, 2.0, 1.0]
    assert s["activation_func"] == "relu" and "embedding_name" not in s


def test_previews_run_in_eval_mode(tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    seen = []
    real = host.render_preview
    run = {}

    def spy(request):
        seen.append(run["kind"].hn.training)
        return real(request)

    from lib_sdtrain.core.tasks import hypernetwork as ht

    original = ht.HypernetworkTraining.__init__

    def keep(self, *a, **k):
        original(self, *a, **k)
        run["kind"] = self

    monkeypatch.setattr(ht.HypernetworkTraining, "__init__", keep)
    monkeypatch.setattr(host, "render_preview", spy)
    train_hypernetwork(host, train_cfg(workspace, steps=2, create_image_every=1), Recorder())
    assert seen == [False, False]
    assert not run["kind"].hn.training  # eval after the run, as the host


def test_stop_then_resume_continues_at_the_step_with_the_optimizer_state(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    path = os.path.join(workspace["hn"], "hyper.pt")
    first = train_hypernetwork(host, train_cfg(workspace, steps=10), Recorder(stop_at=4))
    assert first.stopped and first.step == 4
    assert load_hypernetwork(path).step == 4
    optim = load_hypernetwork_optim(path)
    assert optim is not None and optim["optimizer_name"] == "AdamW"
    assert all(int(s["step"]) == 4 for s in optim["optimizer_state_dict"]["state"].values())

    # without the stopped run's resume point: from the file and its .optim, as the host resumes
    rec = Recorder()
    second = train_hypernetwork(host, train_cfg(workspace, steps=10, resume_interrupted=False), rec)
    assert not second.stopped and second.step == 10
    assert [e["step"] for e in rec.of("step")] == list(range(5, 11))
    assert any("resumed optimizer state" in e["text"] for e in rec.of("log"))
    state = load_hypernetwork_optim(path)["optimizer_state_dict"]["state"]
    assert all(int(s["step"]) == 10 for s in state.values())

    # another optimizer does not take AdamW's state
    rec = Recorder()
    train_hypernetwork(host, train_cfg(workspace, steps=11, optimizer_name="SGD"), rec)
    assert any("holds AdamW state" in e["text"] for e in rec.of("log"))
    assert load_hypernetwork_optim(path)["optimizer_name"] == "SGD"

    again = train_hypernetwork(host, train_cfg(workspace, steps=11), Recorder())
    assert again.step == 11 and "already trained" in again.message


def test_missing_hypernetwork_is_refused(tiny_sd1, workspace):
    with pytest.raises(SdtrainError, match="create it first"):
        train_hypernetwork(
            StandaloneHost(tiny_sd1), train_cfg(workspace, hypernetwork_name="absent"), Recorder()
        )


def test_gradient_checkpointing_and_dropout_train_the_same(tiny_sd1, tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    losses = {}
    for ckpt in (False, True):
        ws = {"data": str(data), "hn": str(tmp_path / f"hn{ckpt}"), "log": ""}
        create_hypernetwork(
            None,
            CreateHypernetworkConfig.from_dict(
                {
                    "name": "hyper",
                    "enable_sizes": [64, 32],
                    "activation_func": "elu",
                    "use_dropout": True,
                    "dropout_structure": "0, 0.2, 0",
                    "hypernetwork_dir": ws["hn"],
                    "seed": 0,
                }
            ),
        )
        rec = Recorder()
        cfg = train_cfg(
            ws,
            steps=3,
            gradient_checkpointing=ckpt,
            training_write_csv_every=0,
            save_training_settings_to_txt=False,
        )
        torch.manual_seed(0)  # dropout masks come from the global RNG, as in the host
        train_hypernetwork(StandaloneHost(tiny_sd1), cfg, rec)
        losses[ckpt] = [e["loss"] for e in rec.of("step")]
    assert len(losses[True]) == 3 and all(map(torch.isfinite, map(torch.tensor, losses[True])))
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
