"""PC-CLIP finetuning: losses, trainable sets, exact resume, the non-finite guard, reuse of finished runs."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pc_clip.core.config import get_config
from pc_clip.models.embed import embed_images
from pc_clip.training.finetune import finetune
from pc_clip.training.plan import caption_table, finetune_captions
from pc_clip.training.losses import difference_contrastive_loss, difference_mse_loss, trainable_parameter_names
from pc_clip.models.clip import create_clip, is_checkpoint, load_checkpoint

N_IMAGES = 12


@pytest.fixture(scope="module")
def base():
    model, _, tokenizer = create_clip("pc-clip-tiny", seed=0)
    return model, tokenizer


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, 32, 32, 3), dtype=np.uint8)
    dim = create_clip("pc-clip-tiny", seed=0)[0].text_projection.shape[1]
    emb = F.normalize(torch.tensor(rng.normal(size=(N_IMAGES, dim)), dtype=torch.float32), dim=-1)
    words = ["larger", "smaller", "redder", "bluer", "brighter", "darker"]
    rows = [dict(i=i, j=j, text=f"the first object is {words[(i * 7 + j) % 6]}")
            for i in range(N_IMAGES) for j in range(N_IMAGES) if i != j]
    return images, emb, pd.DataFrame(rows).iloc[:60].reset_index(drop=True)


def cfg(**kw):
    return get_config("tiny", **{"ft_epochs": 2, "ft_batch_size": 16, "ft_lr": 1e-3, **kw})


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_losses_match_direct_computation():
    g = torch.Generator().manual_seed(1)
    t, a, b = (torch.randn(5, 16, generator=g) for _ in range(3))
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    d = unit(unit(a) - unit(b))
    for tau in (1.0, 0.1):
        logits = unit(t) @ d.T / tau
        # symmetric InfoNCE written out: -log softmax of the diagonal, both directions
        rows = -(logits.diag() - logits.logsumexp(dim=1)).mean()
        cols = -(logits.diag() - logits.logsumexp(dim=0)).mean()
        assert math.isclose(difference_contrastive_loss(t, a, b, tau).item(), ((rows + cols) / 2).item(), rel_tol=1e-5)
    mse = ((unit(t) - (unit(a) - unit(b))) ** 2).sum() / t.numel()
    assert math.isclose(difference_mse_loss(t, a, b).item(), mse.item(), rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["text_blocks", "text_tower", "both_towers"])
def test_only_trainable_parameters_change(base, data, mode, tmp_path):
    model, tok = base
    images, emb, triples = data
    before = state(model)
    run = finetune(model, tok, triples, cfg(ft_epochs=1), tmp_path / mode, image_embeddings=emb, images=images,
                   trainable=mode, progress=False)
    trained = set(trainable_parameter_names(model, mode))
    assert trained and len(run.steps) == math.ceil(len(triples) / 16)
    for name, p in run.model.named_parameters():
        assert torch.equal(p.detach(), before[name]) != (name in trained), f"{mode}: {name}"
    for name, v in model.state_dict().items():  # the model passed in is never modified
        assert torch.equal(v, before[name])
    if mode == "both_towers":  # image features come from the (trained) tower, not a table
        assert any(n.startswith("visual.") for n in trained)


@pytest.mark.parametrize("fast", [{}, dict(ft_fused_attention=True, ft_length_buckets=2)], ids=["plain", "fast-paths"])
def test_resume_reproduces_uninterrupted_run(base, data, tmp_path, fast):
    "Also with fused attention and length buckets: the bucketed batches of an epoch are the same after a resume."
    model, tok = base
    _, emb, triples = data
    c = cfg(ft_epochs=3, ft_grad_accum=2, ft_batch_size=8, **fast)
    full = finetune(model, tok, triples, c, tmp_path / "full", image_embeddings=emb, progress=False)

    def crash(epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        finetune(model, tok, triples, c, tmp_path / "cut", image_embeddings=emb, progress=False, on_epoch_end=crash)
    assert not is_checkpoint(tmp_path / "cut") and (tmp_path / "cut" / "epochs" / "epoch-001").is_dir()
    resumed = finetune(model, tok, triples, c, tmp_path / "cut", image_embeddings=emb, progress=False)
    assert not resumed.reused
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert resumed.steps.loss.tolist() == full.steps.loss.tolist()
    assert resumed.epochs.loss.tolist() == full.epochs.loss.tolist()
    # the saved model is the trained model, loadable as an ordinary checkpoint
    loaded, _, _ = load_checkpoint(tmp_path / "cut")
    assert torch.equal(loaded.transformer.resblocks[2].mlp.c_proj.weight, full.model.transformer.resblocks[2].mlp.c_proj.weight)


def test_finished_run_is_reused_and_changed_inputs_retrain(base, data, tmp_path, monkeypatch):
    model, tok = base
    _, emb, triples = data
    first = finetune(model, tok, triples, cfg(), tmp_path / "r", image_embeddings=emb, progress=False)
    import pc_clip.training.finetune as ft

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(ft, "_step_loss", no_training)
    again = finetune(model, tok, triples, cfg(), tmp_path / "r", image_embeddings=emb, progress=False)
    assert again.reused and again.final_loss == first.final_loss
    assert torch.equal(again.model.transformer.resblocks[0].attn.in_proj_weight,
                       first.model.transformer.resblocks[0].attn.in_proj_weight)
    monkeypatch.undo()
    other = triples.assign(text=triples.text.str.replace("first", "second"))
    changed = finetune(model, tok, other, cfg(), tmp_path / "r", image_embeddings=emb, progress=False)
    assert not changed.reused and changed.run_key != first.run_key
    longer = finetune(model, tok, triples, cfg(ft_epochs=3), tmp_path / "r2", image_embeddings=emb, progress=False)
    assert not longer.reused and len(longer.epochs) == 3


def test_nan_steps_are_skipped_counted_and_limited(base, data, tmp_path):
    model, tok = base
    _, emb, triples = data
    bad = torch.cat([emb, torch.full((1, emb.shape[1]), float("nan"))])
    poisoned = pd.concat([triples, pd.DataFrame([dict(i=N_IMAGES, j=0, text="the first object is larger")])],
                         ignore_index=True)
    run = finetune(model, tok, poisoned, cfg(), tmp_path / "a", image_embeddings=bad, max_bad_fraction=0.3,
                   progress=False)
    assert len(run.steps) == 8 and run.bad_steps == 2 and run.steps.skipped.sum() == 2  # one poisoned step per epoch
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    with pytest.raises(FloatingPointError, match="2 of 8 training steps .* more than max_bad_fraction=0.2"):
        finetune(model, tok, poisoned, cfg(), tmp_path / "b", image_embeddings=bad, max_bad_fraction=0.2, progress=False)


def test_caption_baseline_and_embedding_cache(base, data, tmp_path, runs_dir):
    model, tok = base
    images, _, _ = data
    c = cfg()
    emb = embed_images(model, images, c, progress=False)
    caps = caption_table([f"a photo of object {k % 3}" for k in range(N_IMAGES)])
    run = finetune_captions(model, tok, caps, c, tmp_path / "cap", images=images, batch_size=4, progress=False)
    assert run.hparams["loss"] == "clip" and len(run.epochs) == c.caption_ft_epochs
    assert torch.equal(embed_images(model, images, c, progress=False), emb)
    with pytest.raises(ValueError, match="needs columns"):
        finetune(model, tok, caps, c, tmp_path / "bad", image_embeddings=emb, progress=False)


def test_both_towers_recomputes_the_cached_embeddings(base, data, runs_dir):
    "The per-step image features of both_towers are the same numbers the cache holds for the base model."
    from pc_clip.training.finetune import _image_features
    model, _ = base
    images, _, _ = data
    cached = embed_images(model, images, cfg(), progress=False)
    idx = torch.tensor([3, 1, 3, 0])
    with torch.no_grad():
        live = _image_features(model, idx, None, images, torch.device("cpu"), torch.float32)
    assert torch.allclose(live, cached[idx], atol=1e-5)
