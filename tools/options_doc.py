"""Writes docs/options.md from the job configs (lib_sdtrain.core.options.config, PreprocessConfig): every
field with its default, label and help text as the configs declare them, and a note on when to change it
(WHEN below, one per field name). tests/test_docs.py fails when the page differs from what this writes,
or when a field has no note, so the page cannot drift from the code.

    python tools/options_doc.py          # rewrite docs/options.md
    python tools/options_doc.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "options.md"

#: when to change each field (by name; a name shared by several job kinds means the same there)
WHEN = {
    # create embedding
    "name": "Always: the file's name, and the word you write in prompts (embeddings) or in `<hypernet:name:1>`.",
    "num_vectors_per_token": "1–4 for an object or a face, up to 8–16 for a style; each vector takes a token of "
                             "the prompt's 75.",
    "overwrite_old": "To start a file of the same name again (the old one is replaced).",
    "init_text": "A word close to the concept (`person`, `cat`, `watercolor`): training starts from its vectors. "
                 "`*` starts from the `*` token.",
    "embeddings_dir": "Never in the webui (its `--embeddings-dir` sets it); the CLI's `--embeddings-dir`.",
    "save_format": "`safetensors` for a file other tools load without unpickling; `pt` is what the webui's own "
                   "trainer writes.",
    # create hypernetwork
    "enable_sizes": "Keep the default for SD1; SD2 needs 1024 instead of 768, SDXL 2048 (and 640/1280): the tab "
                    "names the loaded model's sizes.",
    "layer_structure": "Larger middle numbers (`1, 2, 1` → `1, 4, 1`) give a bigger, slower network.",
    "activation_func": "`linear` (none) or `swish` are the usual picks.",
    "weight_init": "Kaiming for relu-like activations, Xavier for sigmoid-like, Normal otherwise.",
    "add_layer_norm": "Rarely; some recipes use it with deeper layer structures.",
    "use_dropout": "Against overfitting a small dataset, with a dropout structure like `0, 0.05, 0.15`.",
    "dropout_structure": "Only with *Use dropout*: one probability per layer-structure entry.",
    "hypernetwork_dir": "Never in the webui (its `--hypernetwork-dir` sets it); the CLI's `--hypernetwork-dir`.",
    # training
    "learn_rate": "Lower it when previews burn or the loss jumps; a schedule (`0.005:200, 1e-3`) starts high "
                  "and settles.",
    "batch_size": "Raise it when memory allows: each step sees more pictures (smoother, slower).",
    "gradient_step": "To get the effect of a larger batch on a small GPU (batch × steps images per update).",
    "data_root": "Always: the folder of training pictures (and their `.txt` captions).",
    "log_directory": "To keep runs apart; relative paths start at the webui's data directory.",
    "training_width": "The model's native size: 512 (SD1), 768 (SD2-768), 1024 (SDXL).",
    "training_height": "As the width.",
    "varsize": "To train pictures at their own size (batch size 1); bucketing is usually the better choice.",
    "steps": "Always: where training ends. A few thousand steps is a typical embedding run.",
    "clip_grad_mode": "When the loss spikes or vectors blow up: `norm` with a value of about 1.",
    "clip_grad_value": "With a clipping mode on.",
    "shuffle_tags": "For tag-style captions (`1girl, red hair, …`), so no tag order is learnt.",
    "tag_drop_out": "With tag captions, 0.1–0.2, so the concept does not hang on one tag.",
    "latent_sampling_method": "`deterministic` or `random` for more variety from few pictures; `once` is fastest.",
    "use_weight": "When the pictures' alpha channel masks what matters (transparent background).",
    "create_image_every": "Lower to watch progress more often (each preview costs a generation); 0 for none.",
    "template_filename": "`subject_filewords.txt` for an object or a person, `style_filewords.txt` for a style.",
    "preview_from_txt2img": "To preview with the txt2img tab's prompt and settings.",
    "preview_prompt": "A prompt of your own for previews (empty: one from the template).",
    "preview_negative_prompt": "With a preview prompt of your own.",
    "preview_steps": "Fewer for quicker previews.",
    "preview_sampler_name": "Any sampler the webui lists.",
    "preview_cfg_scale": "As in txt2img.",
    "preview_seed": "A fixed seed makes previews comparable from step to step.",
    "preview_width": "The model's native size.",
    "preview_height": "The model's native size.",
    "templates_dir": "Never in the webui (its *Prompt templates folder* setting); the CLI's `--templates-dir`.",
    "save_optimizer_state": "Off only to save disk space: without the `.optim` a resumed run restarts its "
                            "optimizer.",
    "save_training_settings_to_txt": "Rarely: it records each run's settings beside its logs.",
    "training_write_csv_every": "Lower for a finer loss CSV.",
    "dataset_filename_word_regex": "When file names carry the caption in a pattern (as the webui's setting).",
    "dataset_filename_join_string": "With the word regex.",
    "training_image_repeats_per_epoch": "Only changes how epochs are counted in logs.",
    "training_enable_tensorboard": "To follow runs in TensorBoard (needs the `tensorboard` package).",
    "training_tensorboard_save_images": "With TensorBoard on, to see previews there.",
    "training_tensorboard_flush_every": "Lower to see TensorBoard updates sooner.",
    "preset": "`recommended` for the options that learned fastest in the toy-world benchmark "
              "([Results](../README.md#results)); fields you set yourself keep your values.",
    "lr_scheduler": "`cosine` or `constant_with_warmup` instead of the webui's rate language.",
    "lr_warmup_steps": "With `cosine` or `constant_with_warmup`: a few percent of the steps.",
    "lr_min": "With `cosine`: where the rate ends.",
    "optimizer_name": "Rarely; AdamW is the webui's. Prodigy wants learning rate 1.",
    "weight_decay": "Rarely; the defaults are the webui's.",
    "momentum": "With SGD only.",
    "betas": "Rarely; empty keeps the optimizer's own.",
    "flip_p": "0.5 for subjects that look the same mirrored (not for text or asymmetric logos).",
    "crop": "`center`/`random` to crop instead of stretching pictures of another shape.",
    "seed": "A fixed seed repeats a run exactly.",
    "loss_type": "`huber` or `smooth_l1` against outlier pictures; mse is the webui's.",
    "huber_c": "With `huber`/`smooth_l1`.",
    "min_snr_gamma": "5 to weigh the timesteps more evenly; often steadier training.",
    "noise_offset": "0.05–0.1 for concepts with very dark or very bright pictures.",
    "timestep_min": "To train on part of the noise range only (rare).",
    "timestep_max": "As the range start.",
    "validation_every": "To see whether training still improves on unseen noise: e.g. every 50–100 steps.",
    "validation_images": "With the validation loss on and no held-out pictures.",
    "validation_split": "0.1–0.2 with 20+ pictures, to measure on pictures never trained on.",
    "validation_dir": "When you have separate validation pictures.",
    "early_stop_patience": "With a validation loss: end the run when it stops improving (e.g. 5).",
    "early_stop_min_delta": "With early stopping, to ignore tiny improvements.",
    "final_file": "`best` with a validation loss: keep the best step instead of the last.",
    "gradient_checkpointing": "When memory runs out (SDXL on 12 GB): slower, much less memory.",
    "attention_optimization": "Off only when the webui's attention optimization breaks training.",
    "mixed_precision": "`no` to train in float32 when half precision gives a non-finite loss.",
    "nan_guard": "Keep it on: a NaN loss would otherwise train garbage.",
    "resume_interrupted": "Off to start a cut-short run over from its file.",
    "resume_point_minutes": "Lower on unreliable machines, 0 to keep points only at saves.",
    "keep_tokens": "With tag shuffling, when the first tags (the trigger word) must stay first.",
    "caption_dropout_rate": "0.05–0.1 so the embedding also works without the caption words.",
    "folder_repeats": "With kohya-style `10_concept/` folders.",
    "ema_decay": "0.999 for smoother final vectors in long runs.",
    "ema_start_step": "With EMA: after the first rough steps.",
    "ema_for_output": "With EMA, to save the averaged tensors as the final file.",
    "ema_for_previews": "With EMA, to preview what the averaged tensors give.",
    "bucketing": "When the pictures have different shapes: each trains near its own shape, nothing cropped.",
    "bucket_step": "Rarely; 0 picks the model's.",
    "bucket_max_aspect": "Lower to keep very long pictures out of extreme buckets.",
    "bucket_upscale": "When many pictures are smaller than the training size.",
    "embedding_name": "Always: the embedding to train (created above it in the tab).",
    "save_embedding_every": "Lower to keep more intermediate files to choose from; 0 for none.",
    "save_image_with_stored_embedding": "Off to save disk space (the PNG cards carry the embedding).",
    "embedding_file": "To train a file outside the embeddings folder (CLI, API).",
    "train_encoders": "SDXL: `clip_l` or `clip_g` to train one vector set only.",
    "learn_rate_clip_l": "SDXL: a rate of its own for the CLIP-L vectors.",
    "learn_rate_clip_g": "SDXL: a rate of its own for the CLIP-G vectors.",
    "norm_limit": "1–2 when an embedding overcooks (vectors grow far longer than real tokens).",
    "hypernetwork_name": "Always: the hypernetwork to train (created above it in the tab).",
    "save_hypernetwork_every": "Lower to keep more intermediate files; 0 for none.",
    "hypernetwork_file": "To train a file outside the hypernetworks folder (CLI, API).",
    # preprocess
    "process_src": "Always: the folder of original pictures (never modified).",
    "process_dst": "Always: where the training set is written (inside the webui's folders for requests).",
    "process_width": "The model's native size.",
    "process_height": "The model's native size.",
    "preprocess_txt_action": "`copy` when the pictures come with `.txt` captions.",
    "process_keep_original_size": "To keep sizes (with bucketing when training).",
    "process_flip": "To double a small set of pictures that look right mirrored.",
    "process_split": "For tall or wide pictures: cut into overlapping squares.",
    "process_caption": "To caption with BLIP (when its model is on disk).",
    "process_caption_deepbooru": "To caption anime-style pictures with tags (when its model is on disk).",
    "process_split_threshold": "With splitting.",
    "process_overlap_ratio": "With splitting.",
    "process_focal_crop": "To crop around faces and detail instead of the centre.",
    "process_focal_crop_face_weight": "With focal crop.",
    "process_focal_crop_entropy_weight": "With focal crop.",
    "process_focal_crop_edges_weight": "With focal crop.",
    "process_focal_crop_debug": "With focal crop, to see why it cropped there.",
    "process_multicrop": "To crop each picture at the size that fits it best.",
    "process_multicrop_mindim": "With auto-sized crop.",
    "process_multicrop_maxdim": "With auto-sized crop.",
    "process_multicrop_minarea": "With auto-sized crop.",
    "process_multicrop_maxarea": "With auto-sized crop.",
    "process_multicrop_objective": "With auto-sized crop.",
    "process_multicrop_threshold": "With auto-sized crop.",
    "overwrite": "To write into a folder that already has files.",
}

#: the options that need more than a table cell (moved from the README's "Training options")
DETAILS = """
## Details

**Aspect-ratio buckets.** With `bucketing` on, images of any shape train near their own shape: each goes to
the bucket of the training area (width × height) whose aspect ratio is closest to its own, with sides that
are multiples of `bucket_step` (0: 64 px for SD1/SD2, whose UNet halves the latent three times; 32 px for
SDXL, twice; another value must be a multiple of that). Images that share a bucket are batched together, so
every batch has one shape. *Fit images by* `resize` stretches the whole image to its bucket (nothing is
cropped; the stretch is at most 15 % at a 512² area with 64 px steps, 3.4 % for SDXL at 1024²); `center` and
`random` keep the shape, cover the bucket and crop only the rest. SDXL gets the matching size conditioning
(source size, the crop — (0, 0) with `resize` —, bucket size). An image smaller than its bucket is never
enlarged unless `bucket_upscale` is on: it trains at the largest step-multiple size that fits inside it
(a side under one step is enlarged to one step, with a warning). Bucketing and *Do not resize images*
refuse each other. The log lists the images per bucket; for a 512×512 area an 800×400 image trains at 704×320.

**Held-out validation and early stopping.** The validation loss (every `validation_every` steps, on fixed
noise and timesteps) uses, in this order: the images of `validation_dir`; or a `validation_split` fraction
of the dataset held out — chosen from the file names, so the same on every run, resume and seed, and the
preprocessed copies of one picture (flips, tiles) stay on the same side; or, as before, the first
`validation_images` training images. Held-out images never enter a training batch. `early_stop_patience`
ends the run after N validations in a row that do not beat the best by more than `early_stop_min_delta`.
`final_file` `best` makes the final file the best step's: its tensors, its step and its `.optim`, as the
intermediate save at that step would be (running the job again trains on from there). The log folder gets
`validation_loss.csv` (step, loss, best_step, best_loss), `loss.png` rings the best step, the tab's chart
marks it, and the final message says where the run stopped and which step it saved. Preprocess's
`validation_split` writes `<destination>/train/` and `<destination>/validation/`, split by source picture.

**Per-encoder learning rates (SDXL).** An SDXL embedding holds a `clip_l` and a `clip_g` vector set.
`learn_rate_clip_l` / `learn_rate_clip_g` give one its own rate: a number or a schedule in the learning-rate
language, read with the same schedule type, warm-up and final rate; `0` keeps that set exactly as it is.
Training still ends where the embedding learning rate's schedule ends, and the CSV shows that rate. Setting
one for an SD1/SD2 embedding, or for an encoder *Text encoders to train* leaves out, is refused naming the field.

**Vector norm limit.** `norm_limit` N: after each optimizer step, a trained vector longer than N × the
typical norm of its encoder's token embeddings (the median row length of the token-embedding table) is
scaled back onto that length; shorter vectors are untouched, and the EMA and every save see the limited
vectors. Vectors far longer than any real token are one cause of "overcooked" embeddings; 1–2 is a starting
point, not a tuned value. Every embedding run ends with a log line giving the largest vector norm per encoder.
"""

KINDS = (
    ("create_embedding", "Create an embedding", "`POST /sdapi/v1/create/embedding`, *Create embedding*"),
    ("create_hypernetwork", "Create a hypernetwork", "`POST /sdapi/v1/create/hypernetwork`, *Create hypernetwork*"),
    ("training", "Training (embeddings and hypernetworks)",
     "`POST /sdapi/v1/train/embedding` and `/train/hypernetwork`, the training forms"),
    ("train_embedding", "Embedding training only", "`POST /sdapi/v1/train/embedding`"),
    ("train_hypernetwork", "Hypernetwork training only", "`POST /sdapi/v1/train/hypernetwork`"),
    ("preprocess", "Preprocess", "`POST /sdapi/v1/preprocess`, *Preprocess images (sdtrain)*"),
)


def _configs() -> dict[str, type]:
    sys.path.insert(0, str(ROOT))
    from lib_sdtrain.core.tasks.registry import job_config_types

    return job_config_types()


def _default(cls: type, f: dataclasses.Field) -> str:
    if f.name in getattr(cls, "HOST_FOLDERS", ()):
        return "the webui's"
    if f.name == "templates_dir":
        return "the extension's `textual_inversion_templates`"
    value = json.loads(json.dumps(f.default))
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else f'"{value}"'
    return f"`{text}`"


def _cell(text: str) -> str:
    """A table cell: pipes escaped, and `<` outside code spans (Markdown would read `<destination>` as HTML)."""
    spans = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(spans))


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?)" else text + "."


def _what(f: dataclasses.Field, other: dataclasses.Field | None = None) -> str:
    """*The tab's label*, then the config's help and choices (`other`: the hypernetwork's, where it differs)."""
    meta = f.metadata
    parts = [f"*{meta.get('label', '').strip()}*" + ("" if not other or other.metadata.get("label") == meta.get("label")
                                                    else f" / *{other.metadata.get('label', '').strip()}*"),
             ""]
    if meta.get("help"):
        parts[0] += ":"
        parts[1] = _sentence(meta["help"])
    if other is not None and other.metadata.get("help") and other.metadata.get("help") != meta.get("help"):
        parts.append("Hypernetworks: " + _sentence(other.metadata["help"]))
    if meta.get("choices"):
        parts.append("One of " + ", ".join(f"`{c}`" for c in meta["choices"]) + ".")
    return " ".join(p for p in parts if p)


def render() -> str:
    configs = _configs()
    emb, hn = configs["train_embedding"], configs["train_hypernetwork"]
    shared = [f.name for f in dataclasses.fields(emb) if f.name in {g.name for g in dataclasses.fields(hn)}]
    lines = [
        "# Options",
        "",
        "<!-- generated by tools/options_doc.py from the job configs; tests/test_docs.py checks it -->",
        "",
        "Every field of every job, as the tab, the HTTP API (the JSON field names) and the command line",
        "(`--field-name`) take it. Every field is optional: a missing one takes the default shown, which for",
        "the webui's own fields is the webui's default. sdtrain's own options are off at their default, so a",
        "run with defaults trains as the webui's trainer did. The same list with types is served by",
        "`GET /sdtrain/v1/schema` and the webui's `/docs`; [the README](../README.md#your-first-embedding)",
        "walks through the fields that matter first.",
        "",
        "Folders marked *the webui's* are set by the webui's command line; a request cannot name them.",
        "",
        "Contents: " + " · ".join(f"[{title}](#{_anchor(title)})" for _, title, _ in KINDS)
        + " · [Details](#details): buckets, held-out validation, SDXL rates, the norm limit",
        "",
    ]
    for key, title, where in KINDS:
        lines += [f"## {title}", "", f"Where: {where}.", ""]
        lines += ["| field | default | what it does (*the tab's label*) | when to change it |",
                  "| --- | --- | --- | --- |"]
        if key == "training":
            rows = [(emb, f, next(g for g in dataclasses.fields(hn) if g.name == f.name))
                    for f in dataclasses.fields(emb) if f.name in shared]
        else:
            cls = configs[key]
            rows = [(cls, f, None) for f in dataclasses.fields(cls)
                    if key not in ("train_embedding", "train_hypernetwork") or f.name not in shared]
        for cls, f, other in rows:
            default = _default(cls, f)
            if other is not None and json.dumps(other.default) != json.dumps(f.default):
                default = f"{default} (embeddings), {_default(hn, other)} (hypernetworks)"
            lines.append(f"| `{f.name}` | {_cell(default)} | {_cell(_what(f, other))} | {_cell(WHEN[f.name])} |")
        lines.append("")
    return "\n".join(lines) + DETAILS


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def missing_notes() -> list[str]:
    """Field names without a note in WHEN."""
    return sorted({f.name for cls in _configs().values() for f in dataclasses.fields(cls)} - set(WHEN))


if __name__ == "__main__":
    if missing_notes():
        sys.exit(f"no note in WHEN for: {', '.join(missing_notes())}")
    text = render()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUT.read_text(encoding="utf-8") == text else "docs/options.md is out of date: "
                 "python tools/options_doc.py")
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
