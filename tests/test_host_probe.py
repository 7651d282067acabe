"""The host probe (lib_sdtrain/hosts/a1111/capabilities.py) and the path sdtrain takes when a webui lacks
something, each on a webui faked to lack it: no Train-tab call, no --hypernetwork-dir, no `<hypernet:...>`,
a UNet whose transformer blocks add into their residual in place. The real webuis are covered by the
host-contract suite (tests/webui: test_host_probe_says_what_this_webui_offers, and every test in Forge
Classic, which lacks all four)."""

from __future__ import annotations

import argparse
import importlib.machinery
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.hosts.a1111 import capabilities, hypernet_prompt
from lib_sdtrain.hosts.forge.trainable import residual_in_place

REPO = Path(__file__).resolve().parents[1]


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


@pytest.fixture
def webui(monkeypatch, tmp_path):
    """A bare A1111-family webui: `modules` with a parser, cmd_opts, paths, an extra-network registry and
    script callbacks, and nothing else (no hypernetworks, no Train-tab builder, no modules_forge)."""
    registry: dict = {}

    class ExtraNetwork:
        def __init__(self, name):
            self.name = name

    callbacks: dict[str, list] = {}

    def adder(kind):
        return lambda fn: callbacks.setdefault(kind, []).append(fn)

    fake = {
        "modules": _module("modules"),
        "modules.paths": _module("modules.paths", models_path=str(tmp_path / "models"), data_path=str(tmp_path)),
        "modules.paths_internal": _module("modules.paths_internal", models_path=str(tmp_path / "models")),
        "modules.cmd_args": _module("modules.cmd_args", parser=argparse.ArgumentParser()),
        "modules.shared": _module("modules.shared", cmd_opts=argparse.Namespace(embeddings_dir=str(tmp_path / "emb"))),
        "modules.extra_networks": _module(
            "modules.extra_networks", extra_network_registry=registry, ExtraNetwork=ExtraNetwork,
            register_extra_network=lambda n: registry.__setitem__(n.name, n)),
        "modules.devices": _module("modules.devices", device=torch.device("cpu")),
        "modules.script_callbacks": _module("modules.script_callbacks", callbacks=callbacks, **{
            f"on_{kind}": adder(kind)
            for kind in ("ui_train_tabs", "ui_tabs", "ui_settings", "before_ui", "app_started", "model_loaded")}),
    }
    for name, m in fake.items():
        monkeypatch.setitem(sys.modules, name, m)
        if "." in name:
            setattr(fake["modules"], name.split(".")[1], m)
    monkeypatch.setattr(hypernet_prompt, "_registered", None)
    monkeypatch.setattr(capabilities, "_train_tab_called", False)
    monkeypatch.setattr(capabilities, "_train_tab", None)
    return types.SimpleNamespace(modules=fake, registry=registry, callbacks=callbacks, root=tmp_path)


# -- the Train tab ---------------------------------------------------------------------------------
def _load_entry_script(webui, monkeypatch):
    """scripts/sdtrain.py as the webui runs it, its tab builder replaced by a recorder."""
    ns = runpy.run_path(str(REPO / "scripts" / "sdtrain.py"))
    built: list[str] = []
    monkeypatch.setitem(ns["on_ui_train_tabs"].__globals__, "build_all_tabs", lambda ctx: built.append("tabs"))
    monkeypatch.setitem(ns["on_ui_train_tabs"].__globals__, "_ui_context", lambda *a: None)
    return webui.callbacks, built


def test_own_tab_only_where_the_train_tab_callback_never_runs(webui, monkeypatch):
    callbacks, built = _load_entry_script(webui, monkeypatch)
    (train_tabs,), (ui_tabs,) = callbacks["ui_train_tabs"], callbacks["ui_tabs"]
    # A1111 / reForge: the Train tab first (modules/ui.py), then the extension tabs: no second copy
    train_tabs(types.SimpleNamespace(txt2img_preview_params=[]))
    assert ui_tabs() == [] and built == ["tabs"]
    assert capabilities.probe().train_tab is True
    # the same process after Reload UI on a webui that never calls the Train-tab callback (Forge Classic)
    tabs = ui_tabs()
    assert [(label, elem) for _, label, elem in tabs] == [("Train (sdtrain)", "sdtrain_tab")] and built == ["tabs"] * 2
    report = capabilities.probe().as_dict()
    assert report["train_tab"] is False and report["tab"] == "own top-level tab"


# -- the hypernetwork flag and folder --------------------------------------------------------------
def _preload():
    return runpy.run_path(str(REPO / "preload.py"))["preload"]


def test_hypernetwork_flag_added_only_where_the_webui_has_none(webui):
    parser = webui.modules["modules.cmd_args"].parser
    _preload()(parser)  # a webui without --hypernetwork-dir (Forge Classic)
    opts = parser.parse_args(["--hypernetwork-dir", str(webui.root / "hn")])
    webui.modules["modules.shared"].cmd_opts = opts
    assert capabilities.hypernetwork_dir() == (str(webui.root / "hn"), "sdtrain's --hypernetwork-dir; the webui has none")
    # the default, without the flag on the command line
    webui.modules["modules.shared"].cmd_opts = parser.parse_args([])
    assert capabilities.hypernetwork_dir()[0] == str(webui.root / "models" / "hypernetworks")
    # A1111's own flag is left alone (a second add would be an argparse conflict error)
    theirs = argparse.ArgumentParser()
    theirs.add_argument("--hypernetwork-dir", default="x", help="hypernetwork directory")
    _preload()(theirs)
    assert theirs.parse_args([]).hypernetwork_dir == "x" and len(theirs._option_string_actions) == 4  # -h, --help
    webui.modules["modules.cmd_args"].parser = theirs
    webui.modules["modules.shared"].cmd_opts = theirs.parse_args([])
    assert capabilities.hypernetwork_dir() == ("x", "the webui's --hypernetwork-dir")


def test_no_flag_at_all_falls_back_to_the_models_folder_and_lists_it(webui):
    """sdtrain installed while the webui ran (its preload not yet run): no cmd_opts.hypernetwork_dir."""
    from lib_sdtrain.core.hypernetwork.network import Hypernetwork, save_hypernetwork
    from lib_sdtrain.hosts.a1111 import runtime

    folder = webui.root / "models" / "hypernetworks"
    assert capabilities.hypernetwork_dir() == (str(folder), "default; the webui has no --hypernetwork-dir")
    (folder / "sub").mkdir(parents=True)
    save_hypernetwork(Hypernetwork("alpha", enable_sizes=[8], layer_structure=[1, 2, 1], activation_func="linear", weight_init="Normal"), folder / "alpha.pt")
    save_hypernetwork(Hypernetwork("beta", enable_sizes=[8], layer_structure=[1, 2, 1], activation_func="linear", weight_init="Normal"), folder / "sub" / "beta.pt")
    (folder / "notes.txt").write_text("not a hypernetwork")
    assert runtime.hypernetwork_names() == ["alpha", "beta"]  # the webui keeps no list: the folder's files
    runtime.refresh_hypernetworks()  # nothing to reload in the webui: must not fail


# -- <hypernet:...> --------------------------------------------------------------------------------
def test_hypernet_prompt_parsed_by_sdtrain_where_the_webui_does_not(webui, monkeypatch):
    from lib_sdtrain.core.hypernetwork.network import Hypernetwork, save_hypernetwork

    folder = webui.root / "hn"
    folder.mkdir()
    save_hypernetwork(Hypernetwork("hx", enable_sizes=[8], layer_structure=[1, 2, 1], activation_func="linear", weight_init="Normal"), folder / "hx.pt")
    assert hypernet_prompt.register_if_missing(lambda: str(folder))
    network = webui.registry["hypernet"]
    assert hypernet_prompt.registered_by_sdtrain()
    network.activate(None, [types.SimpleNamespace(items=["hx", "0.5"])])
    (loaded,) = hypernet_prompt.loaded_hypernetworks()
    assert loaded.name == "hx" and all(m.multiplier == 0.5 for m in loaded.modules())
    network.activate(None, [])  # the next generation, without the tag
    assert hypernet_prompt.loaded_hypernetworks() == []
    with pytest.raises(FileNotFoundError, match=f"no hypernetwork named 'nope' in {folder}"):
        network.activate(None, [types.SimpleNamespace(items=["nope"])])
    with pytest.raises(ValueError, match="the multiplier must be a number"):
        network.activate(None, [types.SimpleNamespace(items=["hx", "lots"])])
    # no webui attention applies it and no UNet patcher exists: the probe says so instead of pretending
    feature = capabilities.hypernet_prompt()
    assert not feature.available and "parsed by sdtrain" in feature.detail and "UNet patcher" in feature.detail
    # with a UNet patcher (modules_forge), sdtrain's always-on script applies it
    monkeypatch.setattr(capabilities, "_has_module", lambda name: name == "modules_forge")
    assert capabilities.hypernet_prompt().detail == "parsed by sdtrain, applied by sdtrain through the UNet patcher"


def test_the_webuis_own_hypernet_network_is_kept(webui):
    theirs = object()
    webui.registry["hypernet"] = theirs
    assert not hypernet_prompt.register_if_missing(lambda: "unused")
    assert webui.registry["hypernet"] is theirs and not hypernet_prompt.registered_by_sdtrain()


def test_report_and_note_name_each_missing_feature(webui):
    hypernet_prompt.register_if_missing(lambda: "unused")
    report = capabilities.probe()
    data = report.as_dict()
    assert set(data["unavailable"]) == {"hypernet_prompt", "png_embeddings", "stock_trainer", "hypernetwork_cards",
                                        "captioning"}
    assert "interrogate.py or deepbooru.py" in data["unavailable"]["captioning"]
    note = report.note()
    assert note.startswith("<span class='sdtrain-note'>Not available in this webui")
    assert "hypernetworks in generation (&lt;hypernet:name:m&gt;)" in note and "no image-embedding decoder" in note
    line = report.log_line()
    assert line.startswith("[sdtrain] host: model ldm/sgm; UI no UI;") and "\n" not in line


# -- attention under autograd ----------------------------------------------------------------------
class Block(torch.nn.Module):
    """A transformer block in the shape every webui's has (norm1/attn1/norm2/attn2 with to_k), adding its
    attention outputs into the residual in place (Forge Classic's ldm_patched: `x += n`) or not (A1111)."""

    def __init__(self, in_place: bool, width: int = 8, context: int = 6, worse: bool = False):
        super().__init__()
        self.in_place, self.worse = in_place, worse
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn1 = torch.nn.Linear(width, width)
        self.attn2 = torch.nn.Module()
        self.attn2.to_k = torch.nn.Linear(context, width)

    def forward(self, x, context=None):
        n = self.attn1(self.norm1(x))
        if self.in_place:
            x += n
        else:
            x = x + n
        n = self.norm2(x) * self.attn2.to_k(context).mean(1, keepdim=True)
        if self.in_place:
            x += n
        else:
            x = x + n
        if self.worse:  # an in-place op on something else autograd saved: no norm clone can help
            y = torch.sigmoid(x)
            y.mul_(2)
            return y
        return x


class Unet(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.proj_in = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList([Block(**kw), Block(**kw)])

    def forward(self, x, context):
        x = self.proj_in(x)
        for b in self.blocks:
            x = b(x, context=context)
        return x


def _backward(unet) -> torch.Tensor:
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 3, 6)
    unet(x, context).pow(2).sum().backward()
    return x.grad


def test_in_place_residuals_are_found_and_made_trainable(monkeypatch):
    from lib_sdtrain.hosts.a1111.host import residuals_usable_by_autograd

    seen = []
    monkeypatch.setattr(capabilities, "record_autograd", seen.append)
    torch.manual_seed(0)
    inplace, plain = Unet(in_place=True), Unet(in_place=False)
    plain.load_state_dict(inplace.state_dict())
    for p in [*inplace.parameters(), *plain.parameters()]:
        p.requires_grad_(False)
    assert residual_in_place(inplace.blocks[0]) is True and residual_in_place(plain.blocks[0]) is False
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _backward(inplace)  # what Forge Classic's TI training hit
    with residuals_usable_by_autograd(inplace) as cloned:
        assert cloned
        grad = _backward(inplace)
    assert torch.allclose(grad, _backward(plain))  # the same gradient as out-of-place code
    assert "adds into its residual in place" in seen[-1] and "Block" in seen[-1]
    with pytest.raises(RuntimeError, match="inplace operation"):
        _backward(inplace)  # hooks gone on exit
    with residuals_usable_by_autograd(plain) as cloned:
        assert not cloned and "nothing to do" in seen[-1]


def test_in_place_ops_beyond_the_norm_inputs_are_refused_with_a_reason():
    from lib_sdtrain.hosts.a1111.host import residuals_usable_by_autograd

    unet = Unet(in_place=True, worse=True)
    with pytest.raises(SdtrainError, match="modifies tensors autograd needs in place"), \
            residuals_usable_by_autograd(unet):
        pass


def test_the_probe_leaves_the_global_rng_alone():
    block = Block(in_place=True)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert residual_in_place(block) is True
    assert torch.equal(torch.rand(4), expected)  # a seeded training run draws the same numbers


# -- the start-up model load ----------------------------------------------------------------------
@pytest.mark.parametrize("has_lock", [True, False])
def test_a_job_waits_for_the_webuis_start_up_model_load(webui, monkeypatch, has_lock):
    """A1111 loads its checkpoint at start-up in a thread of its own, holding sd_models.model_data.lock,
    while its layer constructors are patched (a Linear made then lands on the meta device): a job posted
    meanwhile starts only when the load has ended. A webui without that lock starts it at once."""
    import threading

    from lib_sdtrain.hosts.a1111 import runtime

    load = threading.Lock()
    data = types.SimpleNamespace(lock=load) if has_lock else types.SimpleNamespace()
    monkeypatch.setitem(sys.modules, "modules.sd_models", _module("modules.sd_models", model_data=data))
    ran = threading.Event()
    monkeypatch.setattr(runtime, "job_runners", lambda: {"train_embedding": (object, lambda h, c, ctl: ran.set())})
    monkeypatch.setattr(runtime, "_refresh_embeddings", lambda: None)
    job = runtime._wrapped_runners()["train_embedding"][1]
    load.acquire()  # the start-up load is under way
    worker = threading.Thread(target=job, args=(None, None, None), daemon=True)
    worker.start()
    try:
        assert ran.wait(0.5) is (not has_lock)  # with the lock: not before the load ends
    finally:
        load.release()
    assert ran.wait(5), "the job never ran after the load ended"
    worker.join(5)
