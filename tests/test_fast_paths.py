"""The fast finetuning paths compute what the plain path computes: fused attention (outputs and gradients),
length-bucketed batches (the loss of a fixed batch), and the compiled text tower (a whole training step)."""
import copy
import time

import open_clip
import pandas as pd
import pytest
import torch

from pc_clip.core.config import get_config
from pc_clip.training.finetune import _batches, _Objective, _prepare, _step_loss, finetune
from pc_clip.models.text import can_fuse, encode_text_trimmed, text_tower
from pc_clip.training.losses import difference_contrastive_loss, make_clip_loss, set_trainable
from pc_clip.training.state import FinetuneSettings

EOT = 999  # the largest id in these token rows: open_clip's argmax pooling finds it


def small_clip(width: int = 32, heads: int = 2, layers: int = 1, context: int = 16, seed: int = 0) -> open_clip.CLIP:
    "A CLIP with a small causal text tower (random weights): compiling it on a CPU takes seconds, not minutes."
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=8, patch_size=4, width=16, layers=1, head_width=8),
                           text_cfg=dict(context_length=context, vocab_size=EOT + 1, width=width, heads=heads, layers=layers))
    return model.train()


def token_rows(lengths, context: int = 16, seed: int = 0) -> torch.Tensor:
    "Token ids: random words, the end-of-text token at `length - 1`, zeros after."
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n - 1] = torch.randint(1, EOT, (n - 1,), generator=g)
        ids[r, n - 1] = EOT
    return ids


def features_and_grads(model, ids, fused: bool, compile: str = "off"):
    m = copy.deepcopy(model)
    set_trainable(m, "text_blocks")
    enc = text_tower(m, fused, compile)
    length = int(ids.argmax(-1).max()) + 1
    feats = enc(ids[:, :length])
    (feats.square().sum() + feats[:, :3].sum()).backward()
    return feats.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def assert_grads_close(got: dict, want: dict, rtol=1e-4, atol=1e-5):
    assert sorted(got) == sorted(want) and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("width,heads,layers", [(32, 2, 2), (64, 8, 1)])
def test_fused_attention_matches_outputs_and_gradients(width, heads, layers):
    "fp32 on the CPU: the fused causal path gives today's features and gradients, texts of mixed lengths."
    model = small_clip(width, heads, layers)
    assert can_fuse(model)
    ids = token_rows([3, 16, 9, 5, 12, 2])
    (f0, g0), (f1, g1) = features_and_grads(model, ids, False), features_and_grads(model, ids, True)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and both equal the full-context open_clip forward
        torch.testing.assert_close(f0, model.encode_text(ids), rtol=1e-5, atol=1e-6)
    assert_grads_close(g1, g0)


def test_fused_attention_falls_back_where_it_does_not_apply():
    model = small_clip()
    model.transformer.grad_checkpointing = True
    assert not can_fuse(model)
    ids = token_rows([4, 7])
    with torch.no_grad():  # a tower it does not cover: today's path, bit for bit
        assert torch.equal(encode_text_trimmed(model, ids, fused=True), encode_text_trimmed(model, ids))


def _mixed_run_data(model, n: int = 64):
    import open_clip as oc
    texts = [("the first image has a larger glorp" + (", while the second image shows a bluer vantile in the background"
                                                      if k % 4 == 0 else "")) for k in range(n)]
    g = torch.Generator().manual_seed(1)
    triples = pd.DataFrame(dict(i=torch.randint(0, 32, (n,), generator=g).tolist(),
                                j=torch.randint(0, 32, (n,), generator=g).tolist(), text=texts))
    emb = torch.nn.functional.normalize(torch.randn(32, model.text_projection.shape[1], generator=g), dim=-1)
    return triples, emb, oc.get_tokenizer("ViT-B-32")


def test_bucketed_and_unbucketed_loss_of_a_fixed_batch_are_equal():
    "A batch padded to its own length (bucketed) and the same batch padded to the full context: the same loss."
    from pc_clip.models.clip import create_clip
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    triples, emb, _ = _mixed_run_data(model)
    cfg = get_config("tiny")
    data = _prepare(model, tok, triples, FinetuneSettings(), cfg, emb, None, False, 1)
    s = FinetuneSettings(batch_size=16, length_buckets=4)
    batches = _batches(data.n, s, 0, 1, data.pool_pos)
    short = min(batches, key=lambda b: int(data.pool_pos[b].max()))  # a bucket of short texts
    assert int(data.pool_pos[short].max()) < int(data.pool_pos.max())  # it really pads less than the longest text
    args = (data, s, make_clip_loss(), torch.device("cpu"), torch.float32)
    for batch in (short, torch.arange(16)):
        with torch.no_grad():
            own = _step_loss(model, batch, *args)
            full = difference_contrastive_loss(model.encode_text(data.ids[batch]), emb[data.i[batch]], emb[data.j[batch]])
        torch.testing.assert_close(own, full, rtol=1e-6, atol=1e-6)
    # the same pairs each epoch, once each, and the same batches on every call
    for epoch in (0, 1):
        b = _batches(data.n, s, epoch, 1, data.pool_pos)
        assert torch.equal(torch.cat(b).sort().values, torch.arange(data.n))
        assert all(torch.equal(x, y) for x, y in zip(b, _batches(data.n, s, epoch, 1, data.pool_pos)))


def test_compiled_and_eager_steps_agree():
    "torch.compile of the (fused) text tower: the loss and every gradient of a step match eager, on two lengths."
    torch._dynamo.reset()
    model = small_clip(width=32, heads=2, layers=1)
    t0 = time.perf_counter()
    for lengths in ([3, 16, 9, 5], [4, 6, 2, 7]):  # a second length: the step recompiles (dynamic) and still agrees
        ids = token_rows(lengths, seed=len(lengths) + lengths[0])
        (fe, ge), (fc, gc) = features_and_grads(model, ids, True), features_and_grads(model, ids, True, "default")
        torch.testing.assert_close(fc, fe, rtol=1e-5, atol=1e-5)
        assert_grads_close(gc, ge, rtol=1e-4, atol=1e-5)
    print(f"compiled and checked in {time.perf_counter() - t0:.1f} s")


def test_fast_paths_off_on_tiny_and_runs_repeat(tmp_path):
    "The tiny profile keeps the plain step; a run with the fast paths on repeats itself exactly."
    from pc_clip.models.clip import create_clip
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    triples, emb, _ = _mixed_run_data(model)
    cfg = get_config("tiny", ft_batch_size=16)
    s = FinetuneSettings.from_config(cfg)
    data = _prepare(model, tok, triples, s, cfg, emb, None, False, 1)
    assert _Objective(model, data, s, make_clip_loss(), torch.device("cpu"), torch.float32)._run[-1] is None
    fast = cfg.replace(ft_fused_attention=True, ft_length_buckets=2)
    runs = [finetune(model, tok, triples, fast, tmp_path / k, image_embeddings=emb, epochs=2, progress=False) for k in "ab"]
    assert runs[0].steps.loss.tolist() == runs[1].steps.loss.tolist()
    assert all(torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))
