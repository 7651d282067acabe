"""Let torchvision 0.28.0 (a CUDA build, the only one matching torch 2.13) import on a CPU-only torch.

Its meta registrations for the compiled nms ops fail when those ops are absent; we make the two
decorators conditional on the ops being present. Everything sdtrain's tests touch (transforms,
make_grid) then works; compiled ops keep raising, which nothing here calls.
"""
import importlib.util
import pathlib
import re

spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
patched = re.sub(
    r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$',
    r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))',
    text,
    flags=re.M,
)
if patched != text:
    path.write_text(patched)
