"""Core: the in-memory textual-inversion embedding (one vector set per text encoder)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Key of the single vector set of SD1/SD2 embeddings (the token A1111 writes in `string_to_param`).
SINGLE = "*"
#: Keys of SDXL's two vector sets, as A1111 and kohya store them.
SDXL_KEYS = ("clip_l", "clip_g")


def spread_rows(rows: torch.Tensor | None, n_vectors: int, width: int) -> torch.Tensor:
    """The host's create_embedding rule: `n_vectors` rows picked evenly from the init text's token
    embeddings (row i takes token i·len/n), float32 on the CPU; zeros for an empty init text."""
    vec = torch.zeros((n_vectors, width), dtype=torch.float32)
    if rows is not None and rows.shape[0]:
        for i in range(n_vectors):
            vec[i] = rows[i * int(rows.shape[0]) // n_vectors].detach().float().cpu()
    return vec


@dataclass
class Embedding:
    """A textual-inversion embedding.

    `vectors` maps a text-encoder key to a float32 tensor `[n_vectors, dim]`: `{"*": t}` for
    SD1/SD2, `{"clip_l": t_l, "clip_g": t_g}` for SDXL. Every set has the same `n_vectors`.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    #: Where it was read from, if anywhere.
    filename: str | None = None
    #: Free-form string metadata (written into .safetensors headers).
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shape(self) -> int:
        """Total width, as A1111's `Embedding.shape` (SDXL: clip_g + clip_l widths)."""
        return sum(int(v.shape[-1]) for v in self.vectors.values())

    @property
    def is_sdxl(self) -> bool:
        return set(self.vectors) == set(SDXL_KEYS)

    def checksum(self) -> str:
        """A1111's 4-hex-digit checksum, used to pair an embedding with its `.optim` file.

        Same arithmetic as the host's `Embedding.checksum`: values scaled by 100 in float32,
        truncated to int, folded with (r*281 ^ v*997) mod 2**32, low 16 bits. For SDXL the host
        never computes one; we fold clip_l then clip_g.
        """
        r = 0
        for key in sorted(self.vectors):
            flat = (self.vectors[key].detach().to("cpu", torch.float32).reshape(-1) * 100).tolist()
            for v in flat:
                r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF
        return f"{r & 0xFFFF:04x}"
