"""Job configs: host names and defaults, coercion of UI/JSON values, and errors that name the field."""

from __future__ import annotations

import pytest

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.config import DEFAULT_TEMPLATES_DIR, TrainEmbeddingConfig


def cfg(data_dir, **kw):
    return TrainEmbeddingConfig.from_dict({"embedding_name": "emb", "data_root": data_dir, **kw})


def test_host_defaults(data_dir):
    c = cfg(data_dir)
    assert (c.learn_rate, c.batch_size, c.gradient_step, c.steps) == ("0.005", 1, 1, 100000)
    assert (c.training_width, c.training_height, c.template_filename) == (512, 512, "style_filewords.txt")
    assert (c.create_image_every, c.save_embedding_every, c.latent_sampling_method) == (500, 500, "once")
    assert c.clip_grad_mode == "disabled" and c.save_image_with_stored_embedding is True
    assert c.templates_dir == DEFAULT_TEMPLATES_DIR


def test_values_from_json_and_gradio_are_coerced(data_dir):
    c = cfg(data_dir, learn_rate=0.01, batch_size=2.0, steps="30", varsize="true", tag_drop_out=0)
    assert (c.learn_rate, c.batch_size, c.steps, c.varsize, c.tag_drop_out) == ("0.01", 2, 30, True, 0.0)
    assert cfg(data_dir, preview_prompt=None).preview_prompt == ""  # null → default
    assert TrainEmbeddingConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("batch_size", 1.5),
        ("steps", "many"),
        ("learn_rate", "0.005:abc"),
        ("learn_rate", ""),
        ("clip_grad_mode", "sometimes"),
        ("latent_sampling_method", "always"),
        ("tag_drop_out", 1.5),
        ("training_width", 100),
        ("save_embedding_every", -1),
        ("template_filename", "missing.txt"),
        ("template_filename", "../../etc/passwd"),
        ("template_filename", "none.txt"),  # no [name]: TI would learn nothing
        ("embedding_name", ""),
        ("embedding_name", "../x"),
        ("varsize", "maybe"),
        ("nonsense_field", 1),
    ],
)
def test_bad_values_name_their_field(data_dir, field, value):
    with pytest.raises(ConfigError) as e:
        cfg(data_dir, **{field: value})
    assert e.value.field == field
    assert field in str(e.value)


def test_clip_value_schedule_checked_only_when_clipping(data_dir):
    assert cfg(data_dir, clip_grad_value="junk").clip_grad_value == "junk"
    with pytest.raises(ConfigError) as e:
        cfg(data_dir, clip_grad_mode="norm", clip_grad_value="junk")
    assert e.value.field == "clip_grad_value"


def test_dataset_folder_checked(tmp_path):
    for root in ("", str(tmp_path / "missing")):
        with pytest.raises(ConfigError) as e:
            TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": root})
        assert e.value.field == "data_root"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty"):
        TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(empty)})


def test_describe_lists_every_field_with_label():
    fields = {f["name"]: f for f in TrainEmbeddingConfig.describe()}
    assert fields["learn_rate"]["label"] == "Embedding Learning rate"
    assert fields["clip_grad_mode"]["choices"] == ("disabled", "value", "norm")
    assert all(f["label"] for f in fields.values())
