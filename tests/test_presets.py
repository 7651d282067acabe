"""Presets: a named set of options, filled in where a request sets none, on every surface (config, API, tab)."""

from __future__ import annotations

import pytest

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.config import TrainEmbeddingConfig, TrainHypernetworkConfig
from lib_sdtrain.core.options.presets import PRESETS, apply_preset, preset_fields


def _ti(data_dir, **kw):
    return TrainEmbeddingConfig.from_dict({"embedding_name": "emb", "data_root": data_dir, **kw})


def test_no_preset_is_the_hosts_behaviour(data_dir):
    plain = _ti(data_dir)
    assert plain.preset == "none"
    assert _ti(data_dir, preset="none") == plain
    assert plain.learn_rate == "0.005" and plain.min_snr_gamma == 0.0


def test_the_recommended_preset_fills_what_the_request_leaves_out(data_dir):
    fields = preset_fields("train_embedding", "recommended")
    assert fields, "the recommended preset sets nothing for embeddings"
    c = _ti(data_dir, preset="recommended")
    for name, value in fields.items():
        assert getattr(c, name) == type(getattr(c, name))(value), name
    plain = _ti(data_dir)
    assert any(getattr(c, n) != getattr(plain, n) for n in fields), "the preset changes nothing"
    # a field the request names keeps its value; null counts as not named
    assert _ti(data_dir, preset="recommended", min_snr_gamma=1.0).min_snr_gamma == 1.0
    assert _ti(data_dir, preset="recommended", min_snr_gamma=None).min_snr_gamma == fields["min_snr_gamma"]


def test_a_saved_config_runs_again_as_it_ran(data_dir):
    """The job record holds the filled-in values: a resume or a rerun of it trains the same options even
    if the preset changes in a later release."""
    c = _ti(data_dir, preset="recommended")
    assert TrainEmbeddingConfig.from_dict(c.to_dict()) == c


def test_an_unknown_preset_names_the_field(data_dir):
    with pytest.raises(ConfigError) as e:
        _ti(data_dir, preset="fastest")
    assert e.value.field == "preset" and "recommended" in str(e.value)
    with pytest.raises(ConfigError):
        apply_preset("train_embedding", {"preset": 3})


def test_every_preset_field_is_a_valid_option(data_dir, tmp_path):
    """Each preset's values pass the config's own validation, for each kind it names."""
    for preset in PRESETS.values():
        assert preset.summary, f"{preset.name}: no summary for the tab"
        assert set(preset.fields) == {"train_embedding"}, "a preset for a kind whose config has no preset field"
        fields = preset.fields["train_embedding"]
        c = TrainEmbeddingConfig.from_dict({"embedding_name": "x", "data_root": data_dir, **fields})
        assert all(getattr(c, k) == type(getattr(c, k))(v) for k, v in fields.items())
    assert "preset" not in {f["name"] for f in TrainHypernetworkConfig.describe()}


def test_the_tab_shows_what_a_preset_sets():
    from lib_sdtrain.ui.train_tabs import preset_view

    fields = preset_fields("train_embedding", "recommended")
    note, values = preset_view("train_embedding", "recommended", list(fields))
    assert values == fields
    assert all(k in note for k in fields)
    assert preset_view("train_embedding", "none", list(fields)) == ("", {})


def test_the_command_line_takes_a_preset(data_dir):
    from lib_sdtrain.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["train-embedding", "--embedding-name", "emb", "--data-root", data_dir,
                                      "--preset", "recommended", "--ckpt", "model.safetensors"])
    data = _config_from_args(TrainEmbeddingConfig, args)
    assert data == {"embedding_name": "emb", "data_root": data_dir, "preset": "recommended"}
    assert TrainEmbeddingConfig.from_dict(data).min_snr_gamma == preset_fields("train_embedding", "recommended")[
        "min_snr_gamma"]
