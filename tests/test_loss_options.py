"""Loss options (core.training.loss): the formulas pinned against values worked out by hand (loss types,
min-SNR-γ for eps and v, the two composed with the PNG-alpha weight, noise offset, timestep range), the
config fields and their errors, the resume fingerprint, and short runs on the tiny SD1 proving each
option reaches the loss — while the defaults leave every loss bit-identical to the host's formula."""

from __future__ import annotations

import math
import os

import pytest
import torch
from recorder import Recorder

import lib_sdtrain.core.training.loop as loop
from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.formats.embedding_io import load_embedding, load_optim
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.options.config import (
    CreateEmbeddingConfig,
    CreateHypernetworkConfig,
    TrainEmbeddingConfig,
    TrainHypernetworkConfig,
)
from lib_sdtrain.core.port import NoiseSchedule
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.core.tasks.textual_inversion import create_embedding, train_embedding
from lib_sdtrain.core.training.loss import (
    PLAIN,
    LossOptions,
    elementwise_loss,
    min_snr_weight,
    sample_noise,
    sample_timesteps,
    snr,
)
from lib_sdtrain.core.training.resume import NEUTRAL_FIELDS, fingerprint
from lib_sdtrain.hosts.standalone.host import StandaloneHost

LOSS_FIELDS = ("loss_type", "huber_c", "min_snr_gamma", "noise_offset", "timestep_min", "timestep_max")


# -- the formulas, by hand ------------------------------------------------------------------------------
def test_loss_types_by_hand():
    # d = 0, 1, -1.8, 0.4 with c = 0.75: d² + c² = 0.5625, 1.5625 (1.25²), 3.8025 (1.95²), 0.7225 (0.85²)
    pred, target = torch.tensor([0.5, 1.5, -1.3, 0.9]), torch.full((4,), 0.5)
    c = 0.75
    cases = {
        "mse": [0.0, 1.0, 3.24, 0.16],
        "l1": [0.0, 1.0, 1.8, 0.4],
        "huber": [0.0, 1.5 * 0.5, 1.5 * 1.2, 1.5 * 0.1],  # 2c·(√(d²+c²) - c)
        "smooth_l1": [0.0, 2 * 0.5, 2 * 1.2, 2 * 0.1],  # 2·(√(d²+c²) - c)
    }
    for kind, want in cases.items():
        got = elementwise_loss(pred, target, kind, c)
        assert torch.allclose(got, torch.tensor(want), atol=1e-6), (kind, got)
    # pseudo-Huber: ≈ d² well below c, ≈ 2c·|d| - 2c² well above it
    small, large = torch.tensor([1e-3]), torch.tensor([100.0])
    assert elementwise_loss(small, torch.zeros(1), "huber", 0.1).item() == pytest.approx(1e-6, rel=1e-3)
    assert elementwise_loss(large, torch.zeros(1), "huber", 0.1).item() == pytest.approx(2 * 0.1 * 100 - 2 * 0.01,
                                                                                          rel=1e-5)
    with pytest.raises(ValueError, match="l2"):
        elementwise_loss(pred, target, "l2")


def schedule_of(alphas, prediction="eps"):
    return NoiseSchedule(alphas_cumprod=torch.tensor(alphas, dtype=torch.float32), prediction=prediction)


def test_min_snr_weights_by_hand():
    # ā = 0.5, 0.8, 0.9, 0.95, 0 → SNR = ā/(1-ā) = 1, 4, 9, 19, 0
    sched = schedule_of([0.5, 0.8, 0.9, 0.95, 0.0])
    s = snr(sched.alphas_cumprod, torch.arange(5))
    assert torch.allclose(s, torch.tensor([1.0, 4.0, 9.0, 19.0, 0.0], dtype=torch.float64), atol=1e-5)
    eps = min_snr_weight(s, 5.0, "eps")  # min(SNR, γ)/SNR; 1 at SNR 0 (the limit, not 0/0)
    assert torch.allclose(eps, torch.tensor([1, 1, 5 / 9, 5 / 19, 1], dtype=torch.float64), atol=1e-6)
    v = min_snr_weight(s, 5.0, "v")  # min(SNR, γ)/(SNR + 1)
    assert torch.allclose(v, torch.tensor([1 / 2, 4 / 5, 5 / 10, 5 / 20, 0], dtype=torch.float64), atol=1e-6)


class ZeroHost:
    """Predicts 0 everywhere and records what it was asked: the loss is then a function of the target only."""

    def __init__(self):
        self.calls = []

    def predict(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t)


def test_diffusion_loss_min_snr_eps_v_and_alpha_weight_by_hand():
    sched = schedule_of([0.5, 0.8, 0.9, 0.95])
    t = torch.tensor([1, 2])  # SNR 4 and 9
    noise = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])  # ε² means: 1 and 4
    x0 = torch.zeros(2, 1, 2, 2)
    gamma = LossOptions(min_snr_gamma=5.0)

    def loss(schedule, options, weight=None):
        return loop.diffusion_loss(ZeroHost(), schedule, x0, None, t=t, noise=noise, weight=weight,
                                   options=options).item()

    # eps: target ε; weights min(SNR, 5)/SNR = 1, 5/9
    assert loss(sched, None) == pytest.approx((1 + 4) / 2)
    assert loss(sched, gamma) == pytest.approx((1 * 1 + 4 * 5 / 9) / 2, rel=1e-6)  # 29/18
    # v: target √ā·ε - √(1-ā)·x0 = √ā·ε → error means ā·ε² = 0.8 and 3.6; weights min(SNR, 5)/(SNR+1) = 4/5, 1/2
    v = schedule_of([0.5, 0.8, 0.9, 0.95], "v")
    assert loss(v, None) == pytest.approx((0.8 + 3.6) / 2, rel=1e-6)
    assert loss(v, gamma) == pytest.approx((0.8 * 4 / 5 + 3.6 * 1 / 2) / 2, rel=1e-6)  # 1.22
    # the PNG-alpha weight scales each element first: sample 0 keeps half its pixels → its mean is 0.5
    w = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 2)])
    assert loss(sched, None, w) == pytest.approx((0.5 + 4) / 2)
    assert loss(sched, gamma, w) == pytest.approx((0.5 * 1 + 4 * 5 / 9) / 2, rel=1e-6)  # 49/36
    # a loss type and min-SNR compose: L1 means 1 and 2
    assert loss(sched, LossOptions(loss_type="l1", min_snr_gamma=5.0)) == pytest.approx((1 + 2 * 5 / 9) / 2,
                                                                                        rel=1e-6)


def old_diffusion_loss(host, schedule, x0, cond, *, weight=None, generator=None):
    """diffusion_loss as it was before the loss options, verbatim: the reference for the defaults."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(x0.device, x0.dtype)
    a = schedule.alphas_cumprod.to(x0.device)[t.to(x0.device)].to(x0.dtype).view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = host.predict(x_t, t.to(x0.device), cond)
    target = noise if schedule.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    err = (out.float() - target.float()) ** 2
    if weight is not None:
        w = weight.to(err.device, err.dtype)
        err = err * (w.unsqueeze(1) if w.dim() == 3 else w)
    return err.mean()


class AffineHost:
    def predict(self, x_t, t, cond):
        return 0.7 * x_t + t.view(-1, 1, 1, 1) / 1000


def test_default_options_are_the_old_loss_bit_for_bit():
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    weight = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    for prediction in ("eps", "v"):
        sched = NoiseSchedule(alphas_cumprod=alphas, prediction=prediction)
        for w in (None, weight):
            g_old, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            old = old_diffusion_loss(AffineHost(), sched, x0, None, weight=w, generator=g_old)
            for options in (None, PLAIN, LossOptions(timestep_max=1000)):
                g_new.manual_seed(5)
                new = loop.diffusion_loss(AffineHost(), sched, x0, None, weight=w, generator=g_new, options=options)
                assert torch.equal(old, new)
                assert torch.equal(g_old.get_state(), g_new.get_state())  # the same random draws


def test_noise_offset_draws_one_shift_per_sample_and_channel_after_the_noise():
    shape = (256, 4, 8, 8)
    plain = sample_noise(shape, PLAIN, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    noise = sample_noise(shape, LossOptions(noise_offset=0.1), g)
    ref = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=ref)
    shift = torch.randn((256, 4, 1, 1), generator=ref)
    assert torch.equal(plain, base)  # off: exactly the host's draw
    assert torch.allclose(noise, base + 0.1 * shift, atol=1e-7)
    assert torch.equal(g.get_state(), ref.get_state())  # from the same generator, nothing else drawn
    extra = noise - base  # constant over the pixels of each (sample, channel), std ≈ offset
    assert torch.allclose(extra, extra[..., :1, :1].expand_as(extra), atol=1e-6)
    assert extra[..., 0, 0].std().item() == pytest.approx(0.1, rel=0.1)
    assert abs(extra[..., 0, 0].mean().item()) < 0.02


def test_timestep_range_is_uniform_over_min_to_max_excluded():
    sched = schedule_of([0.5] * 1000)
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, sched, LossOptions(timestep_min=200, timestep_max=300), g)
    assert t.min().item() == 200 and t.max().item() == 299
    counts = torch.bincount(t - 200, minlength=100)
    assert counts.min().item() > 120 and counts.max().item() < 280  # 200 expected each
    default = sample_timesteps(5, sched, PLAIN, torch.Generator().manual_seed(3))
    assert torch.equal(default, torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(3)))


# -- the config fields --------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TrainEmbeddingConfig, TrainHypernetworkConfig])
def test_fields_defaults_and_errors_name_the_field(cls, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    name = "embedding_name" if cls is TrainEmbeddingConfig else "hypernetwork_name"
    base = {name: "x", "data_root": str(tmp_path)}
    cfg = cls.from_dict(base)
    assert [getattr(cfg, f) for f in LOSS_FIELDS] == ["mse", 0.1, 0.0, 0.0, 0, 1000]
    spec = {f["name"]: f for f in cls.describe()}
    assert spec["loss_type"]["choices"] == ("mse", "l1", "huber", "smooth_l1")
    assert all(spec[f]["label"] for f in LOSS_FIELDS)
    ok = cls.from_dict({**base, "loss_type": "huber", "huber_c": "0.2", "min_snr_gamma": 5, "noise_offset": 0.05,
                        "timestep_min": 100, "timestep_max": 900})
    assert (ok.loss_type, ok.huber_c, ok.min_snr_gamma, ok.noise_offset, ok.timestep_min, ok.timestep_max) == (
        "huber", 0.2, 5.0, 0.05, 100, 900)
    bad = [
        ({"loss_type": "l2"}, "loss_type"),
        ({"huber_c": 0}, "huber_c"),
        ({"min_snr_gamma": -1}, "min_snr_gamma"),
        ({"noise_offset": -0.1}, "noise_offset"),
        ({"noise_offset": 1.5}, "noise_offset"),
        ({"timestep_min": -1}, "timestep_min"),
        ({"timestep_max": 1001}, "timestep_max"),
        ({"timestep_min": 500, "timestep_max": 500}, "timestep_max"),
        ({"timestep_max": "high"}, "timestep_max"),
    ]
    for extra, field in bad:
        with pytest.raises(ConfigError) as e:
            cls.from_dict({**base, **extra})
        assert e.value.field == field, extra


def test_timestep_max_beyond_the_models_schedule_is_refused():
    class Cfg:
        loss_type, huber_c, min_snr_gamma, noise_offset, timestep_min, timestep_max = "mse", 0.1, 0, 0, 0, 1000

    with pytest.raises(ConfigError) as e:
        LossOptions.from_config(Cfg, schedule_of([0.5] * 500))
    assert e.value.field == "timestep_max" and "500" in e.value.message
    assert LossOptions.from_config(Cfg, schedule_of([0.5] * 1000)).timestep_max == 1000


def test_the_loss_fields_are_part_of_the_resume_fingerprint(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    base = {"embedding_name": "x", "data_root": str(tmp_path)}
    assert not NEUTRAL_FIELDS & set(LOSS_FIELDS)
    ref = fingerprint(TrainEmbeddingConfig.from_dict(base))
    changed = {"loss_type": "l1", "huber_c": 0.3, "min_snr_gamma": 5, "noise_offset": 0.1, "timestep_min": 1,
               "timestep_max": 999}
    for key, value in changed.items():
        assert fingerprint(TrainEmbeddingConfig.from_dict({**base, key: value})) != ref, key


# -- runs on the tiny SD1 -----------------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path):
    return {"data": str(write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)), "root": tmp_path}


def ti_run(host, ws, sub, control=None, **kw):
    """A fresh 'tester' embedding in its own folder, trained `steps` (default 2) steps with batch 2."""
    emb = str(ws["root"] / sub / "embeddings")
    if not os.path.isfile(os.path.join(emb, "tester.pt")):
        create_embedding(host, CreateEmbeddingConfig.from_dict(
            {"name": "tester", "num_vectors_per_token": 2, "init_text": "shape", "embeddings_dir": emb}))
    cfg = {"embedding_name": "tester", "embeddings_dir": emb, "data_root": ws["data"],
           "log_directory": str(ws["root"] / sub / "log"), "training_width": 64, "training_height": 64,
           "steps": 2, "learn_rate": "0.05", "batch_size": 2, "template_filename": "subject_filewords.txt",
           "save_embedding_every": 0, "create_image_every": 0, "training_write_csv_every": 0, "seed": 3,
           "resume_point_minutes": 0, **kw}
    rec = control or Recorder()
    result = train_embedding(host, TrainEmbeddingConfig.from_dict(cfg), rec)
    return result, [e["loss"] for e in rec.of("step")]


def spy(monkeypatch, name):
    """Record the arguments and result of each call of core.training.loop's `name`."""
    calls = []
    real = getattr(loop, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(loop, name, wrapper)
    return calls


def test_defaults_train_exactly_as_the_old_loss(tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    _, new = ti_run(host, workspace, "new", steps=3, use_weight=True)
    monkeypatch.setattr(loop, "diffusion_loss", lambda *a, options=None, **k: old_diffusion_loss(*a, **k))
    _, old = ti_run(host, workspace, "old", steps=3, use_weight=True)
    assert new == old and len(new) == 3


def test_timestep_range_in_a_run_and_the_validation_loss_keeps_its_timesteps(tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    seen = []
    real = host.predict
    monkeypatch.setattr(host, "predict", lambda x_t, t, cond: seen.append(t.tolist()) or real(x_t, t, cond))
    ti_run(host, workspace, "range", steps=3, timestep_min=700, timestep_max=710, validation_every=3,
           validation_images=1)
    validation = [[200, 400, 599, 799]]  # evenly spread over the whole schedule, at step 0 and step 3
    assert seen[0] == seen[-1] == validation[0]
    trained = seen[1:-1]
    assert len(trained) == 3 and all(700 <= t < 710 for ts in trained for t in ts)


@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sd1_v"])
def test_min_snr_run_weights_each_sample(model, workspace, monkeypatch, request):
    host = StandaloneHost(request.getfixturevalue(model))
    schedule = host.noise_schedule()
    calls = spy(monkeypatch, "reduce_loss")
    _, plain = ti_run(host, workspace, "plain", steps=1)
    _, weighted = ti_run(host, workspace, "snr", steps=1, min_snr_gamma=2.0)
    (p_args, _, p_out), (w_args, _, w_out) = calls
    err, t = w_args[0], w_args[1]
    assert torch.equal(err, p_args[0]) and torch.equal(t, p_args[1])  # the same draws and prediction
    a = schedule.alphas_cumprod.double()[t]
    s = a / (1 - a)
    w = torch.clamp(s, max=2.0) / (s if schedule.prediction == "eps" else s + 1)
    per_sample = err.double().mean(dim=(1, 2, 3))
    assert weighted[0] == pytest.approx((per_sample * w).mean().item(), rel=1e-5)
    assert plain[0] == pytest.approx(err.double().mean().item(), rel=1e-6)
    assert not math.isclose(plain[0], weighted[0], rel_tol=1e-3)
    assert (p_out.item(), w_out.item()) == (plain[0], weighted[0])  # what the run reported


@pytest.mark.parametrize("loss_type", ["l1", "huber"])
def test_loss_type_in_a_run(loss_type, tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    calls = spy(monkeypatch, "elementwise_loss")
    _, plain = ti_run(host, workspace, "plain", steps=1)
    _, other = ti_run(host, workspace, loss_type, steps=1, loss_type=loss_type, huber_c=0.5)
    (p_args, _, _), (o_args, _, _) = calls
    assert torch.equal(p_args[0], o_args[0]) and torch.equal(p_args[1], o_args[1])
    d = (o_args[0] - o_args[1]).double()
    assert plain[0] == pytest.approx((d**2).mean().item(), rel=1e-6)
    want = d.abs() if loss_type == "l1" else 2 * 0.5 * (torch.sqrt(d**2 + 0.25) - 0.5)
    assert other[0] == pytest.approx(want.mean().item(), rel=1e-5)
    assert not math.isclose(plain[0], other[0], rel_tol=1e-3)


def test_noise_offset_in_a_run_shifts_each_latent_channel(tiny_sd1, workspace, monkeypatch):
    host = StandaloneHost(tiny_sd1)
    seen = []
    real = host.predict
    monkeypatch.setattr(host, "predict", lambda x_t, t, cond: seen.append((x_t.clone(), t)) or real(x_t, t, cond))
    ti_run(host, workspace, "plain", steps=1)
    ti_run(host, workspace, "offset", steps=1, noise_offset=0.1)
    (x_plain, t_plain), (x_off, t_off) = seen
    assert torch.equal(t_plain, t_off)
    a = host.noise_schedule().alphas_cumprod[t_off].view(-1, 1, 1, 1)
    shift = (x_off - x_plain) / (1 - a).sqrt()  # x_t = √ā·x0 + √(1-ā)·(ε + offset·s)
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-5)  # one value per channel
    assert shift.abs().max().item() > 1e-3 and shift.abs().max().item() < 0.6


def test_every_option_resumes_bit_identical_and_trains_a_hypernetwork(tiny_sd1, workspace):
    host = StandaloneHost(tiny_sd1)
    options = {"loss_type": "smooth_l1", "huber_c": 0.2, "min_snr_gamma": 5, "noise_offset": 0.1,
               "timestep_min": 100, "timestep_max": 900, "steps": 4}
    ref, _ = ti_run(host, workspace, "ref", **options)
    first, _ = ti_run(host, workspace, "resumed", control=Recorder(stop_at=2), **options)
    assert first.stopped and os.path.isfile(first.file + ".resume")
    second, losses = ti_run(host, workspace, "resumed", **options)
    assert "(resumed from step 2)" in second.message and len(losses) == 2
    a, b = load_embedding(ref.file), load_embedding(second.file)
    assert torch.equal(a.vectors["*"], b.vectors["*"])
    oa, ob = load_optim(ref.file, a.checksum()), load_optim(second.file, b.checksum())
    sa, sb = oa["optimizer_state_dict"]["state"], ob["optimizer_state_dict"]["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)

    hn = str(workspace["root"] / "hn")
    create_hypernetwork(None, CreateHypernetworkConfig.from_dict(
        {"name": "h", "enable_sizes": [64, 32], "hypernetwork_dir": hn, "seed": 0}))
    before = [p.detach().clone() for p in load_hypernetwork(os.path.join(hn, "h.pt")).trainable_params()]
    rec = Recorder()
    result = train_hypernetwork(host, TrainHypernetworkConfig.from_dict(
        {"hypernetwork_name": "h", "hypernetwork_dir": hn, "data_root": workspace["data"],
         "log_directory": str(workspace["root"] / "hnlog"), "training_width": 64, "training_height": 64,
         "learn_rate": "0.002", "batch_size": 2, "save_hypernetwork_every": 0, "create_image_every": 0,
         "seed": 3, **options, "steps": 2}), rec)
    after = load_hypernetwork(result.file).trainable_params()
    assert result.step == 2 and all(math.isfinite(e["loss"]) for e in rec.of("step"))
    assert any(not torch.equal(x, y) for x, y in zip(before, after))
