"""Host(Forge, reForge): `<hypernet:name:m>` applied in generation again.

Both webuis still parse `<hypernet:...>` and load the files into `shared.loaded_hypernetworks`
(modules/extra_networks_hypernet.py; Forge Classic removed that too, and sdtrain parses the tag itself:
hosts/a1111/hypernet_prompt.py), but nothing reads that list any more: A1111's attention
overrides that applied it are commented out, and the UNet is their own (Forge backend/nn/unet.py,
reForge ldm_patched). Their UNet patchers take attention patches instead: `attn1_patch` /
`attn2_patch` functions get `(n, context, value, extra_options)` and return the three, and
`context` feeds `to_k`, `value` feeds `to_v`. This always-on script puts one such patch on a
*clone* of the generation's UNet patcher before every sampling pass (the hook the host's own
extensions use, e.g. Forge's perturbed-attention guidance), so nothing of the model changes and
the next generation starts clean. The patches are plain closures: the patcher deep-copies its
options and calls `.to()` on patch objects that have one, which must not cast the modules.
"""

from __future__ import annotations

from modules import scripts

from lib_sdtrain.core.hypernetwork.attach import apply_hypernetworks
from lib_sdtrain.hosts.a1111 import hypernet_prompt

K, V = 0, 1


def hypernetwork_patch(hypernetworks: list):
    hns = tuple(hypernetworks)

    def patch(n, context, value, extra_options):
        return n, apply_hypernetworks(hns, context, K), apply_hypernetworks(hns, value, V)

    patch.__sdtrain_hypernetworks__ = True
    return patch


def _patched(unet) -> bool:
    patches = unet.model_options.get("transformer_options", {}).get("patches", {})
    return any(getattr(p, "__sdtrain_hypernetworks__", False) for p in patches.get("attn1_patch", []))


class HypernetworksInGeneration(scripts.Script):
    """Always visible, no UI: applies the prompt's hypernetworks through the UNet patcher."""

    def title(self):
        return "sdtrain: hypernetworks in generation"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_before_every_sampling(self, p, *args, **kwargs):
        hypernetworks = hypernet_prompt.loaded_hypernetworks()
        objects = getattr(p.sd_model, "forge_objects", None)
        if not hypernetworks or objects is None or _patched(objects.unet):
            return
        unet = objects.unet.clone()
        patch = hypernetwork_patch(hypernetworks)
        unet.set_model_attn1_patch(patch)
        unet.set_model_attn2_patch(patch)
        objects.unet = unet
