"""The webuis the host-contract suite runs in, as data: one `HostSpec` per host.

A spec says how to start the host, which model files it needs, and which capabilities it claims.
Tests state what they need with `@pytest.mark.needs("capability", ...)`; conftest marks a test
that the selected host cannot pass as skipped *with the host's reason*, and fails a test whose
capability the host neither claims nor declines (so a new capability cannot be skipped silently).

The host under test is `SDTRAIN_WEBUI_HOST` (set by `tools/webui.sh`; default a1111).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Every capability a test may ask for, with what it means.
CAPABILITIES = {
    "sd1": "trains SD1 embeddings and hypernetworks through sdtrain's routes, tabs and jobs",
    "train_tab": "the host has a Train tab: sdtrain's sub-tabs go inside it",
    "sd2": "loads an SD2 checkpoint (OpenCLIP text encoder, v-prediction) that sdtrain trains",
    "inpainting": "loads an SD1 inpainting checkpoint (9-channel UNet, hybrid conditioning)",
    "sdxl": "loads an SDXL base checkpoint (sgm DiffusionEngine, CLIP-L + CLIP-G) that sdtrain trains",
    "stock_trainer": "the host's own (in-tree) trainer runs, to exchange files with it",
    "hypernetwork_prompt": "the host applies `<hypernet:name:m>` in generation",
    "preprocess": "sdtrain's preprocess route and sub-tab",
}


@dataclass(frozen=True)
class HostSpec:
    name: str
    title: str
    #: host-specific flags added to the shared start command (CPU, offline, API, data dir, model)
    launch_args: tuple[str, ...]
    #: the SD1 model this host's detector accepts: "tiny" (a tiny random SD1 and its yaml) or
    #: "full" (a random SD1.5 at its real shapes)
    sd1_model: str
    claims: frozenset[str]
    #: capability → why this host cannot pass tests needing it
    cannot: dict[str, str] = field(default_factory=dict)
    #: the host reads the CLIP tokenizer/config by hub name from HF_HOME (offline cache layout)
    clip_in_hf_cache: bool = True
    #: the log line that says the server is ready for requests
    ready_line: str = "Startup time:"

    def verdict(self, capability: str) -> str | None:
        """None when the host claims `capability`; else why a test needing it cannot run here."""
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown capability {capability!r} (known: {', '.join(CAPABILITIES)})")
        if capability in self.claims:
            return None
        if capability in self.cannot:
            return f"{self.title} cannot: {self.cannot[capability]}"
        raise LookupError(f"{self.title} neither claims nor declines capability {capability!r}: "
                          "add it to its spec in tests/webui/hosts.py")


A1111 = HostSpec(
    name="a1111",
    title="AUTOMATIC1111 v1.10.1",
    launch_args=("--skip-prepare-environment", "--skip-version-check", "--use-cpu", "all", "--no-half",
                 "--precision", "full", "--skip-torch-cuda-test", "--no-download-sd-model"),
    sd1_model="tiny",
    claims=frozenset(CAPABILITIES),
)

HOSTS = {spec.name: spec for spec in (A1111,)}


def selected() -> HostSpec:
    name = os.environ.get("SDTRAIN_WEBUI_HOST", "a1111")
    if name not in HOSTS:
        raise KeyError(f"SDTRAIN_WEBUI_HOST={name!r} is not a known host ({', '.join(HOSTS)})")
    return HOSTS[name]
