"""Host(standalone): writes a CLIP BPE tokenizer folder from the vocabulary file open_clip ships.

SD1's text encoder uses OpenAI's CLIP tokenizer (hub name openai/clip-vit-large-patch14). Its 49408-entry
vocabulary is fully determined by `bpe_simple_vocab_16e6.txt.gz`, which the open_clip package carries, so
the folder `CLIPTokenizer.from_pretrained` needs can be generated offline in a fraction of a second.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
#: How many merge rules CLIP uses: the vocab is 256 bytes x2 (plain and word-final), the merges, 2 specials.
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def find_bpe_file() -> Path:
    """The BPE merges file next to the installed open_clip package, located without importing it
    (importing open_clip pulls torchvision, which need not import on every machine)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"open_clip is not installed, so {BPE_FILE} cannot be found")
    path = Path(spec.origin).parent / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP's vocabulary order.

    Bytes that are already visible, non-space Latin-1 characters stand for themselves and come first;
    every other byte (controls, space, soft hyphen...) is given a code point from 256 upwards, in byte
    order, so BPE never sees whitespace or control characters inside a token.
    """
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    visible_set = set(visible)
    hidden = [b for b in range(256) if b not in visible_set]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def read_merges(bpe_path: Path | None = None) -> list[tuple[str, str]]:
    """CLIP's merge rules: lines 1..N_MERGES of the file (line 0 is a version header)."""
    text = gzip.decompress((bpe_path or find_bpe_file()).read_bytes()).decode("utf-8")
    lines = text.split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {N_MERGES} merge rules of two symbols each")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a vocabulary of {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


def write_clip_tokenizer(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
    `directory` (created if needed) and return it. Loads with `CLIPTokenizer.from_pretrained`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    merges = read_merges()
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    # Same special tokens as openai/clip-vit-large-patch14: padding uses the end token, which is
    # also what A1111 pads SD1 prompts with.
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        **specials,
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return out
