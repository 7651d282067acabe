"""A test-only extension: the training objective the webui's in-tree trainers optimise, next to sdtrain's,
on the same sample, inside the running webui.

`POST /sdtrain-test/objective {"kind": "ti"|"hn", "name": ..., "text": ..., "t": [...]}` encodes one fixed
picture, then for each timestep computes the loss and the gradient of the trained tensors twice:

- the in-tree way: the latent as the host's dataset makes it ("deterministic": the posterior's std set to
  0, then `get_first_stage_encoding`), the conditioning from `cond_stage_model` with the host's own
  embedding object (TI, the one its database loaded from the file) or the host's own `Hypernetwork`
  loaded from the file into `shared.loaded_hypernetworks` (HN), and the loss of ldm's
  `p_losses(x0, c, t, noise)` — what `sd_model.forward(x, c)` returns after drawing t and the noise;
- sdtrain's way: its host adapter (`A1111Host`) inside its GPU session, the file read by sdtrain's own
  loader, and `core.training.loop.diffusion_loss` with the same t and noise.

It answers both losses and, per trained tensor, the largest absolute difference of the gradients and the
gradients' largest magnitude. Only hosts whose model has ldm's `p_losses` (the ones with an in-tree
trainer over ldm's model and posterior: A1111) can answer; elsewhere it says so with 501.
"""

OBJECTIVE_SCRIPT = '''
import torch
from fastapi import HTTPException
from modules import script_callbacks, shared


def _picture():
    g = torch.Generator().manual_seed(1234)
    return torch.rand((1, 3, 64, 64), generator=g) * 2 - 1, g


def _in_tree_latent(m, pixels):
    with torch.no_grad():
        dist = m.encode_first_stage(pixels)
        dist.std = torch.zeros_like(dist.std)  # the host dataset's "deterministic" sampling
        return m.get_first_stage_encoding(dist)


def _stock_grads(m, kind, name, text, x0, t, noise):
    from modules import sd_hijack
    from modules.hypernetworks import hypernetwork as stock

    if kind == "ti":
        emb = sd_hijack.model_hijack.embedding_db.word_embeddings[name]
        emb.vec.requires_grad_(True)
        try:
            c = m.cond_stage_model([text])
            loss = m.p_losses(x0, c, t, noise=noise)[0]
            return float(loss), list(torch.autograd.grad(loss, [emb.vec]))
        finally:
            emb.vec.requires_grad_(False)
    hn = stock.Hypernetwork()
    hn.load(shared.hypernetworks[name])
    previous = shared.loaded_hypernetworks
    shared.loaded_hypernetworks = [hn]
    weights = hn.weights()
    hn.train()
    try:
        c = m.cond_stage_model([text])
        loss = m.p_losses(x0, c, t, noise=noise)[0]
        return float(loss), list(torch.autograd.grad(loss, weights))
    finally:
        shared.loaded_hypernetworks = previous


def _sdtrain_grads(kind, name, text, pixels, t, noise):
    from lib_sdtrain.core.formats.embedding_io import load_embedding
    from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
    from lib_sdtrain.core.port import SessionOptions
    from lib_sdtrain.core.training.loop import diffusion_loss
    from lib_sdtrain.hosts.a1111.host import A1111Host
    from modules import sd_hijack

    host = A1111Host()
    with host.gpu_session("objective-test", SessionOptions()):
        x0 = host.encode_images(pixels).mean
        schedule = host.noise_schedule()
        if kind == "ti":
            path = sd_hijack.model_hijack.embedding_db.word_embeddings[name].filename
            vectors = {k: v.clone().requires_grad_(True) for k, v in load_embedding(path).vectors.items()}
            with host.use_embedding(name, vectors):
                loss = diffusion_loss(host, schedule, x0, host.encode_text([text]), t=t, noise=noise)
                return float(loss), list(torch.autograd.grad(loss, list(vectors.values())))
        hn = load_hypernetwork(shared.hypernetworks[name]).train()
        with host.use_hypernetwork([hn]):
            loss = diffusion_loss(host, schedule, x0, host.encode_text([text]), t=t, noise=noise)
            return float(loss), list(torch.autograd.grad(loss, hn.trainable_params()))


def objective(body: dict):
    m = shared.sd_model
    if not hasattr(m, "p_losses"):
        raise HTTPException(501, "the loaded model has no ldm p_losses: no in-tree objective to compare with")
    pixels, g = _picture()
    with torch.no_grad():
        posterior = m.encode_first_stage(pixels)
    if not isinstance(getattr(posterior, "std", None), torch.Tensor):
        raise HTTPException(501, f"the first stage of {type(m).__name__} gives no ldm posterior: no in-tree "
                                 "dataset latent to compare with")
    x0 = _in_tree_latent(m, pixels)
    out = []
    for step in body["t"]:
        t = torch.tensor([int(step)])
        noise = torch.randn(x0.shape, generator=g)
        stock_loss, stock = _stock_grads(m, body["kind"], body["name"], body["text"], x0, t, noise)
        ours_loss, ours = _sdtrain_grads(body["kind"], body["name"], body["text"], pixels, t, noise)
        out.append({"t": int(step), "loss_in_tree": stock_loss, "loss_sdtrain": ours_loss,
                    "grads": [{"max_abs_diff": float((a.float() - b.float()).abs().max()),
                               "max_abs": float(a.float().abs().max()), "shape": list(a.shape)}
                              for a, b in zip(stock, ours)],
                    "counts": [len(stock), len(ours)]})
    return out


def on_app_started(_demo, app):
    app.add_api_route("/sdtrain-test/objective", objective, methods=["POST"])


script_callbacks.on_app_started(on_app_started)
'''
