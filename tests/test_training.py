"""Tests of `pc_clip.training`: losses, exact resume, pretraining, the validation sweep, data-parallel
finetuning and the fast paths (fused attention, length buckets, a compiled tower)."""
import math
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import time
import ast
import inspect
import pc_clip.training.plan
import pc_clip.training.selection
import pc_clip.training.sweep
import json
import os
import subprocess
import sys
import textwrap
import copy
import open_clip
from safetensors.torch import load_file, save_file
from conftest import REPO

from pc_clip.core.config import embedding_options, get_config, world_settings
from pc_clip.models.embed import embed_images
from pc_clip.training.finetune import finetune, _batches, _Objective, _prepare, _step_loss
from pc_clip.training.plan import caption_table, finetune_captions, pretrain_or_load
from pc_clip.training.losses import (difference_contrastive_loss, difference_mse_loss,
    trainable_parameter_names, make_clip_loss, set_trainable)
from pc_clip.models.clip import (create_clip, is_checkpoint, load_checkpoint, checkpoint_metadata, load_clip,
    find_models)
from pc_clip.training.pretrain import (PRETRAIN_THREADS, PretrainSettings, pretrain_clip,
    pretrain_fingerprint, warmup_cosine)
from pc_clip.world.shapes import build_world, make_world
from pc_clip.core.run import cache_dir
from pc_clip.core.results import result_row
from pc_clip.training.selection import VAL_METRICS, candidate_table, choose_setting, target_check
from pc_clip.training.sweep import save_chosen, candidate_folders, read_candidates, write_candidates
from pc_clip.core.registry import sweep_grid, world_options
from pc_clip.smoke.fixtures import temp_workdir
from pc_clip.models.text import can_fuse, encode_text_trimmed, text_tower
from pc_clip.training.state import FinetuneSettings
from pc_clip.core.registry import clip_source, model_dir, models_dir


# ---- PC-CLIP finetuning: losses, trainable sets, exact resume, the non-finite guard, reuse of finished runs.

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
        assert math.isclose(difference_contrastive_loss(t, a, b, tau).item(), ((rows + cols) / 2).item(),
                            rel_tol=1e-5)
    mse = ((unit(t) - (unit(a) - unit(b))) ** 2).sum() / t.numel()
    assert math.isclose(difference_mse_loss(t, a, b).item(), mse.item(), rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["text_blocks", "text_tower", "both_towers"])
def test_only_trainable_parameters_change(base, data, mode, tmp_path):
    model, tok = base
    images, emb, triples = data
    before = state(model)
    run = finetune(model, tok, triples, FinetuneSettings.from_config(cfg(ft_epochs=1), trainable=mode),
                   tmp_path / mode, image_embeddings=emb, images=images, progress=False)
    trained = set(trainable_parameter_names(model, mode))
    assert trained and len(run.steps) == math.ceil(len(triples) / 16)
    for name, p in run.model.named_parameters():
        assert torch.equal(p.detach(), before[name]) != (name in trained), f"{mode}: {name}"
    for name, v in model.state_dict().items():  # the model passed in is never modified
        assert torch.equal(v, before[name])
    if mode == "both_towers":  # image features come from the (trained) tower, not a table
        assert any(n.startswith("visual.") for n in trained)


@pytest.mark.parametrize("fast", [{}, dict(ft_fused_attention=True, ft_length_buckets=2)],
                         ids=["plain", "fast-paths"])
def test_resume_reproduces_uninterrupted_run(base, data, tmp_path, fast):
    """Also with fused attention and length buckets: the bucketed batches of an epoch are the same after a
    resume."""
    model, tok = base
    _, emb, triples = data
    c = cfg(ft_epochs=3, ft_grad_accum=2, ft_batch_size=8, **fast)
    full = finetune(model, tok, triples, FinetuneSettings.from_config(c), tmp_path / "full",
                    image_embeddings=emb, progress=False)

    def crash(epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        finetune(model, tok, triples, FinetuneSettings.from_config(c), tmp_path / "cut",
                 image_embeddings=emb, progress=False, on_epoch_end=crash)
    assert not is_checkpoint(tmp_path / "cut") and (tmp_path / "cut" / "epochs" / "epoch-001").is_dir()
    resumed = finetune(model, tok, triples, FinetuneSettings.from_config(c), tmp_path / "cut",
                       image_embeddings=emb, progress=False)
    assert not resumed.reused
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert resumed.steps.loss.tolist() == full.steps.loss.tolist()
    assert resumed.epochs.loss.tolist() == full.epochs.loss.tolist()
    # the saved model is the trained model, loadable as an ordinary checkpoint
    loaded, _, _ = load_checkpoint(tmp_path / "cut")
    assert torch.equal(loaded.transformer.resblocks[2].mlp.c_proj.weight,
                       full.model.transformer.resblocks[2].mlp.c_proj.weight)


def test_finished_run_is_reused_and_changed_inputs_retrain(base, data, tmp_path, monkeypatch):
    model, tok = base
    _, emb, triples = data
    first = finetune(model, tok, triples, FinetuneSettings.from_config(cfg()), tmp_path / "r",
                     image_embeddings=emb, progress=False)
    import pc_clip.training.finetune as ft

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(ft, "_step_loss", no_training)
    again = finetune(model, tok, triples, FinetuneSettings.from_config(cfg()), tmp_path / "r",
                     image_embeddings=emb, progress=False)
    assert again.reused and again.final_loss == first.final_loss
    assert torch.equal(again.model.transformer.resblocks[0].attn.in_proj_weight,
                       first.model.transformer.resblocks[0].attn.in_proj_weight)
    monkeypatch.undo()
    other = triples.assign(text=triples.text.str.replace("first", "second"))
    changed = finetune(model, tok, other, FinetuneSettings.from_config(cfg()), tmp_path / "r",
                       image_embeddings=emb, progress=False)
    assert not changed.reused and changed.run_key != first.run_key
    longer = finetune(model, tok, triples, FinetuneSettings.from_config(cfg(ft_epochs=3)), tmp_path / "r2",
                      image_embeddings=emb, progress=False)
    assert not longer.reused and len(longer.epochs) == 3


def test_nan_steps_are_skipped_counted_and_limited(base, data, tmp_path):
    model, tok = base
    _, emb, triples = data
    bad = torch.cat([emb, torch.full((1, emb.shape[1]), float("nan"))])
    poisoned = pd.concat([triples, pd.DataFrame([dict(i=N_IMAGES, j=0, text="the first object is larger")])],
                         ignore_index=True)
    run = finetune(model, tok, poisoned, FinetuneSettings.from_config(cfg(), max_bad_fraction=0.3),
                   tmp_path / "a", image_embeddings=bad, progress=False)
    # one poisoned step per epoch
    assert len(run.steps) == 8 and run.bad_steps == 2 and run.steps.skipped.sum() == 2
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    with pytest.raises(FloatingPointError, match="2 of 8 training steps .* more than max_bad_fraction=0.2"):
        finetune(model, tok, poisoned, FinetuneSettings.from_config(cfg(), max_bad_fraction=0.2),
                 tmp_path / "b", image_embeddings=bad, progress=False)


def test_caption_baseline_and_embedding_cache(base, data, tmp_path, runs_dir):
    model, tok = base
    images, _, _ = data
    c = cfg()
    emb = embed_images(model, images, cache_dir(c), **embedding_options(c), progress=False)
    caps = caption_table([f"a photo of object {k % 3}" for k in range(N_IMAGES)])
    run = finetune_captions(model, tok, caps, c, tmp_path / "cap", images=images, batch_size=4,
                            progress=False)
    assert run.hparams["loss"] == "clip" and len(run.epochs) == c.caption_ft_epochs
    assert torch.equal(embed_images(model, images, cache_dir(c), **embedding_options(c), progress=False), emb)
    with pytest.raises(ValueError, match="needs columns"):
        finetune(model, tok, caps, FinetuneSettings.from_config(c), tmp_path / "bad",
                 image_embeddings=emb, progress=False)


def test_both_towers_recomputes_the_cached_embeddings(base, data, runs_dir):
    "The per-step image features of both_towers are the same numbers the cache holds for the base model."
    from pc_clip.training.finetune import _image_features
    model, _ = base
    images, _, _ = data
    cached = embed_images(model, images, cache_dir(cfg()), **embedding_options(cfg()), progress=False)
    idx = torch.tensor([3, 1, 3, 0])
    with torch.no_grad():
        live = _image_features(model, idx, None, images, torch.device("cpu"), torch.float32)
    assert torch.allclose(live, cached[idx], atol=1e-5)


# ---- Pretraining the tiny base model: a fixed number of steps, nothing read from the clock, bit-identical
# weights.

@pytest.fixture(scope="module")
def small_world():
    return build_world(0, 256, 32, n_val=32)


def _cfg(**kw):
    return get_config("tiny", **{**dict(pretrain_steps=6, pretrain_batch_size=32, pretrain_lr=1e-3), **kw})


def _same_weights(m1, m2) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_slowed_run_gives_bit_identical_weights(small_world):
    "A run that sleeps after every step (as beside a busy CPU) trains exactly the same model, in more time."
    cfg = _cfg(pretrain_steps=4)
    before = torch.get_num_threads()
    slept = []
    slow_step = lambda step, loss: (time.sleep(0.25), slept.append(step))
    m_fast, _, h_fast = pretrain_clip(small_world, PretrainSettings.from_config(cfg), device="cpu",
                                      progress=False, threads=2)
    m_slow, _, h_slow = pretrain_clip(small_world, PretrainSettings.from_config(cfg), device="cpu",
                                      progress=False, threads=2, on_step=slow_step)
    assert slept == [0, 1, 2, 3] and h_slow["seconds"] >= 1.0  # really slowed down, after every step ...
    assert h_fast["steps"] == h_slow["steps"] == 4 and h_slow["loss"] == h_fast["loss"]
    assert h_slow["lr"] == h_fast["lr"]
    assert h_fast["lr"][-1] == pytest.approx(cfg.pretrain_lr * warmup_cosine(3, 4))
    assert _same_weights(m_fast, m_slow)  # ... and still bit-identical
    assert torch.get_num_threads() == before  # the caller's thread count is restored


def test_caller_thread_setting_does_not_change_weights(small_world):
    "The thread count is fixed inside the call, so the caller's own `torch.set_num_threads` does not matter."
    cfg = _cfg()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        m1, _, _ = pretrain_clip(small_world, PretrainSettings.from_config(cfg), device="cpu",
                                 progress=False, threads=1)
        torch.set_num_threads(1)
        m2, _, h2 = pretrain_clip(small_world, PretrainSettings.from_config(cfg), device="cpu",
                                  progress=False, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert h2["threads"] == 1 and _same_weights(m1, m2)
    assert PRETRAIN_THREADS == 2  # the default: fixed, whatever the caller set


def test_fingerprint_covers_the_settings_that_change_weights(small_world):
    cfg = _cfg()
    s = PretrainSettings.from_config(cfg)
    fp = pretrain_fingerprint(s, small_world)
    changed = [cfg.replace(pretrain_steps=7), cfg.replace(pretrain_lr=2e-3),
               cfg.replace(pretrain_batch_size=16), cfg.replace(seed=1), cfg.replace(pretrain_warmup=0.2),
               cfg.replace(pretrain_weight_decay=0.0), cfg.replace(pretrain_betas=(0.9, 0.95)),
               cfg.replace(pretrain_eps=1e-8)]
    fps = {fp} | {pretrain_fingerprint(PretrainSettings.from_config(c), small_world) for c in changed}
    fps |= {pretrain_fingerprint(s, small_world, threads=1)}
    assert len(fps) == 10


def test_pretrain_then_reuse_checkpoint(runs_dir):
    "The base model is trained once, saved, and reloaded bit-identically; other steps train another model."
    cfg = _cfg(world_n_train=256, world_n_test=32, world_n_val=32)
    world = make_world(**world_options(cfg))
    m1, _, h1, reused1 = pretrain_or_load(world, cfg, device="cpu", progress=False, threads=1)
    m2, _, h2, reused2 = pretrain_or_load(world, cfg, device="cpu", progress=False, threads=1)
    assert (reused1, reused2) == (False, True) and h1["steps"] == 6 and h2["loss"] == h1["loss"]
    folder = model_dir(cfg, "clip")
    assert is_checkpoint(folder) and folder.is_relative_to(runs_dir)
    assert _same_weights(m1, m2)
    _, _, h3, reused3 = pretrain_or_load(world, cfg.replace(pretrain_steps=3), device="cpu", progress=False,
                                         threads=1)
    assert not reused3 and h3["steps"] == 3


# ---- The finetuning-strength selection: the rule decides on validation records only, and `pc-clip` is the
# chosen candidate.

BASE = dict(zip(VAL_METRICS, (0.55, 0.50, 0.78, 0.50, 0.30)))


def _rows(cands: dict, base: bool = True) -> list[dict]:
    """Validation records of clip and of candidates `{(lr, alpha): (diff, held, zs, worst, retrieval)
    changes}`."""
    rows = [dict(model="clip", lr=np.nan, alpha=np.nan, metric=m, value=v)
            for m, v in BASE.items()] if base else []
    for (lr, a), ch in cands.items():
        rows += [dict(model="pc-clip", lr=lr, alpha=a, metric=m, value=BASE[m] + c)
                 for m, c in zip(VAL_METRICS, ch)]
    return rows


CANDS = {(1e-3, 0.5): (0.06, 0.04, 0.0, -0.01, -0.01),  # feasible, moderate gain
         (1e-3, 1.0): (0.12, 0.08, -0.04, -0.2, -0.1),  # large gain, loses zero-shot
         (2e-3, 0.25): (0.07, 0.03, -0.005, 0.0, -0.015),  # feasible, the best feasible gain
         (2e-3, 1.0): (0.20, 0.10, -0.09, -0.4, -0.2)}


def test_rule_picks_best_feasible_gain_from_validation_rows():
    table, chosen = choose_setting(candidate_table(pd.DataFrame(_rows(CANDS))))
    assert (chosen.lr, chosen.alpha) == (2e-3, 0.25)
    assert table.set_index(["lr", "alpha"])["feasible"].to_dict() == {
        (1e-3, 0.5): True, (1e-3, 1.0): False, (2e-3, 0.25): True, (2e-3, 1.0): False}


def test_lr_and_alpha_are_values_never_parsed_from_condition_labels():
    """selection.py and sweep.py read no setting back out of a `condition` string: no float(...) of
    condition_dict in them."""
    for module in (pc_clip.training.selection, pc_clip.training.sweep):
        tree = ast.parse(inspect.getsource(module))
        parsed = [n for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "float"
                  and any(isinstance(a, ast.Call) and getattr(a.func, "id", "") == "condition_dict"
                          for a in ast.walk(n))]
        assert not parsed, [ast.unparse(n) for n in parsed]
    # a record whose label says something else: the numbers decide
    recs = pd.DataFrame(_rows(CANDS)).assign(condition="alpha=9;lr=9")
    assert sorted(candidate_table(recs)["lr"].unique()) == [1e-3, 2e-3]


def test_written_candidates_come_back_as_numbers(runs_dir):
    cfg = get_config("tiny")
    write_candidates(choose_setting(candidate_table(pd.DataFrame(_rows(CANDS))))[0], cfg)
    back = read_candidates(cfg)
    assert back["lr"].dtype == float and back["alpha"].dtype == float
    assert back.loc[back.chosen, ["lr", "alpha"]].values.tolist() == [[2e-3, 0.25]]


def test_no_import_circle_between_the_sweep_and_finetune_plan():
    "finetune_plan (below) never imports the sweep or the selection rule (above), not even inside a function."
    src = inspect.getsource(pc_clip.training.plan)
    for module in ("selection", "sweep"):
        assert f"pc_clip.training.{module}" not in src and f".{module} import" not in src


def test_nothing_feasible_takes_smallest_shortfall_and_says_so():
    two = {k: CANDS[k] for k in [(1e-3, 1.0), (2e-3, 1.0)]}
    table, chosen = choose_setting(candidate_table(pd.DataFrame(_rows(two))))
    assert (chosen.lr, chosen.alpha, bool(chosen.feasible)) == (1e-3, 1.0, False)


def test_missing_base_rows_is_an_error():
    rows = [r for r in _rows(CANDS) if r["model"] != "clip"]
    with pytest.raises(ValueError, match="base model 'clip'"):
        candidate_table(pd.DataFrame(rows))


def test_grid_and_candidate_folders():
    cfg = get_config("tiny", ft_lr_grid=(1e-3, 2e-3), wavg_alpha_grid=(0.5, 1.0))
    assert sweep_grid(cfg) == [(1e-3, 0.5), (1e-3, 1.0), (2e-3, 0.5), (2e-3, 1.0)]
    folders = set(candidate_folders(cfg).values())
    # the chosen copy never overwrites a candidate
    assert len(folders) == 4 and model_dir(cfg, "pc-clip") not in folders
    # a run with one learning rate finds the sweep's finetune at that rate
    assert model_dir(get_config("tiny", ft_lr=2e-3), "pc-clip") == candidate_folders(cfg)[(2e-3, 1.0)]
    paper = get_config("paper")
    assert sweep_grid(paper) == [(paper.ft_lr, 1.0)]
    assert list(candidate_folders(paper).values()) == [model_dir(paper, "pc-clip")]


def test_saved_choice_is_what_later_experiments_load_as_pc_clip():
    base, finetuned = create_clip("pc-clip-tiny", seed=0)[0], create_clip("pc-clip-tiny", seed=1)[0]
    with temp_workdir():
        cfg = get_config("tiny", ft_lr_grid=(1e-3, 2e-3), wavg_alpha_grid=(0.25, 1.0))
        save_chosen(base, finetuned, cfg, "pc-clip", 2e-3, 0.25)
        loaded = load_clip(**clip_source(cfg, "pc-clip", "cpu"))[0].state_dict()
        key = "transformer.resblocks.0.mlp.c_fc.weight"
        want = torch.lerp(base.state_dict()[key], finetuned.state_dict()[key], 0.25)
        assert torch.allclose(loaded[key], want)
        meta = checkpoint_metadata(model_dir(cfg, "pc-clip"))["selection"]
        assert (meta["lr"], meta["alpha"]) == (2e-3, 0.25)
        assert meta["finetuned"] == model_dir(cfg, "pc-clip", lr=2e-3).name
        # which folder is pc-clip: its manifest says
        (manifest,) = find_models(models_dir(cfg), "pc-clip", role="pc-clip")
        assert manifest["path"] == str(model_dir(cfg, "pc-clip")) and manifest["selection"]["alpha"] == 0.25
        # a one-point grid at alpha 1: the finetune already is pc-clip, nothing is written
        one = cfg.replace(ft_lr=1e-3, ft_lr_grid=(), wavg_alpha_grid=())
        assert save_chosen(base, finetuned, one, "pc-clip", 1e-3, 1.0) is finetuned
        assert not model_dir(one, "pc-clip").exists()


def _outcome_items(model, task, metric, hits, cond="", seed=0, groups=None, statistic="mean"):
    "One cell's per-item outcomes as the experiments store them (item ids 0..n-1)."
    n = len(hits)
    return pd.DataFrame(dict(model=model, task=task, dataset="world", condition=cond, metric=metric,
                             seed=seed,
                             item=np.arange(n).astype(str), value=np.asarray(hits, float), weight=1.0,
                             group=np.zeros(n, int) if groups is None else groups, statistic=statistic))


def test_targets_on_test_ignore_validation_rows():
    rows = [result_row("clip", "zero_shot", "world", "accuracy", 0.78, 0, 100),
            result_row("pc-clip", "zero_shot", "world", "accuracy", 0.76, 0, 100),
            result_row("pc-clip", "zero_shot", "world", "accuracy", 0.95, 0, 100, {"split": "val"})]
    hits = lambda k: (np.arange(100) < k).astype(float)
    items = pd.concat([_outcome_items("clip", "zero_shot", "accuracy", hits(78)),
                       _outcome_items("pc-clip", "zero_shot", "accuracy", hits(76)),
                       _outcome_items("clip", "zero_shot", "accuracy", hits(0), "split=val"),
                       _outcome_items("pc-clip", "zero_shot", "accuracy", hits(100), "split=val")])
    t = target_check(pd.DataFrame(rows), items=items).set_index("target")
    assert t.loc["zero-shot accuracy", "items"] == 100
    assert abs(t.loc["zero-shot accuracy", "change"] + 0.02) < 1e-9
    # the two lost items give an interval from -0.05 or so to 0: it straddles the -0.01 threshold
    assert t.loc["zero-shot accuracy", "ci_low"] < -0.01 < t.loc["zero-shot accuracy", "ci_high"] <= 0
    assert t.loc["zero-shot accuracy", "met"] == "inconclusive"
    # without per-item outcomes: the point change of the test rows (the validation row ignored), no verdict
    bare = target_check(pd.DataFrame(rows)).set_index("target")
    assert bare.loc["zero-shot accuracy", "met"] == "not measured"
    assert abs(bare.loc["zero-shot accuracy", "change"] + 0.02) < 1e-9
    assert np.isnan(bare.loc["zero-shot accuracy", "ci_low"]) and bare.loc["zero-shot accuracy", "items"] == 0


def test_target_verdicts_follow_the_interval_on_constructed_outcomes():
    """Outcome tables whose intervals are known by construction: each target's verdict is the interval's side
    of its threshold."""
    n, rng = 1000, np.random.default_rng(1)
    base = (rng.random(n) < 0.5).astype(float)
    # right wherever clip is, and on ~20 % more: never worse
    gained = np.maximum(base, (rng.random(n) < 0.4).astype(float))
    lost = base * (rng.random(n) < 0.9)  # wrong on ~10 % of clip's hits: never better
    classes = np.arange(n) % 4
    parts = []
    for seed in (0, 1):  # two seeds: paired item by item within each
        parts += [_outcome_items("clip", "difference_classification", "accuracy", base, f"wording={w}", seed)
                  for w in ("train", "heldout")]
        parts += [_outcome_items("pc-clip", "difference_classification", "accuracy", gained, "wording=train",
                                 seed),
                  _outcome_items("pc-clip", "difference_classification", "accuracy", base, "wording=heldout",
                                 seed)]
    for m in ("clip", "pc-clip"):  # zero-shot: the same outcomes (a zero interval); worst class: the same too
        parts += [_outcome_items(m, "zero_shot", "accuracy", base),
                  _outcome_items(m, "zero_shot", "worst_class_accuracy", base, groups=classes,
                                 statistic="worst_group")]
    parts += [_outcome_items("clip", "retrieval", "recall@5_i2t", base),
              _outcome_items("pc-clip", "retrieval", "recall@5_i2t", lost)]
    t = target_check(pd.DataFrame(columns=["model", "task", "condition", "metric", "dataset", "value"]),
                     items=pd.concat(parts, ignore_index=True)).set_index("target")
    gain = (gained - base).mean()
    # the held-out wordings are their own target
    trained = t.loc["difference classification, training wordings"]
    assert abs(trained["change"] - gain) < 1e-12 and trained["cells"] == 1 and trained["items"] == 2 * n
    assert 0 <= trained["ci_low"] < gain < trained["ci_high"] and trained["ci_low"] > 0.05
    held = t.loc["difference classification, held-out wordings"]
    assert (held["ci_low"], held["ci_high"], held["met"]) == (0.0, 0.0, "no")  # no change at all: below +0.03
    # 0 > -0.01
    assert t.loc["zero-shot accuracy", "met"] == "yes" and t.loc["zero-shot accuracy", "ci_low"] == 0.0
    worst = t.loc["worst-class zero-shot accuracy"]
    assert worst["met"] == "yes"
    assert abs(worst["clip"] - min(base[classes == k].mean() for k in range(4))) < 1e-12
    ret = t.loc["mean retrieval recall"]
    assert ret["ci_high"] < -0.02 and ret["met"] == "no" and ret["ci_high"] <= 0
    assert t.loc["difference classification, training wordings", "met"] == "yes"


def test_validation_retrieval_is_experiment_07s_protocol_on_the_val_images(runs_dir):
    """The sweep's validation retrieval is experiment 07's test protocol (images x captions, seeds) on the
    val images."""
    from pc_clip.core.run import cache_dir
    from pc_clip.evaluation.runner import RETRIEVAL_CAPTIONS, RETRIEVAL_IMAGES, run_retrieval
    from pc_clip.models.clip import save_checkpoint
    from pc_clip.training.sweep import validation_outcomes
    from pc_clip.world.shapes import world_key
    # the defaults agree: experiment 07's n_images, the runner's captions per image, the sweep's
    nb = json.loads((REPO / "nbs/experiments/07_retrieval.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = {n.target.id if isinstance(n, ast.AnnAssign) else n.targets[0].id: n.value
                for n in ast.parse("".join(params["source"])).body
                if isinstance(n, (ast.Assign, ast.AnnAssign))}
    assert ast.literal_eval(assigned["n_images"]) == RETRIEVAL_IMAGES
    sig = inspect.signature(validation_outcomes).parameters
    assert sig["retrieval_images"].default == RETRIEVAL_IMAGES
    assert sig["n_captions"].default == RETRIEVAL_CAPTIONS
    assert inspect.signature(run_retrieval).parameters["n_captions"].default == RETRIEVAL_CAPTIONS
    # and the protocol is one: on a world whose val and test splits are swapped, experiment 07's runner
    # scores the
    # very retrieval outcomes the sweep scored on validation (same images, captions and seed), item for item
    cfg = get_config("tiny", world_n_train=40, world_n_val=60, world_n_test=50)
    world = make_world(**world_options(cfg))
    save_checkpoint(create_clip("pc-clip-tiny", seed=0)[0], model_dir(cfg, "clip"), "pc-clip-tiny")
    model, _, tokenizer = load_clip(**clip_source(cfg, "clip", "cpu"))
    val = validation_outcomes(model, tokenizer, cfg, world, retrieval_images=40)["retrieval_mean_recall"][1]
    swapped = world.attrs.assign(split=world.attrs["split"].replace({"val": "test", "test": "val"}))
    swapped.to_csv(cache_dir(cfg) / "world" / f"{world_key(**world_settings(cfg))}.attrs.csv", index=False)
    assert (make_world(**world_options(cfg)).indices("test") == world.indices("val")).all()
    test = run_retrieval(cfg, ["clip"], n_images=40, progress=False)
    assert len(test) == 6
    for row in test:
        mine = val[val["item"].str.startswith(row["metric"] + "|")]
        n_items = 40 if row["metric"].endswith("i2t") else 40 * RETRIEVAL_CAPTIONS
        assert len(mine) == len(row["items"]) == n_items
        assert (mine["value"].to_numpy() == row["items"]["value"].to_numpy()).all(), row["metric"]


# ---- Data-parallel finetuning under torchrun: 2 CPU processes (gloo) equal one process on the same global
# batch,

SETTINGS = {"ft_batch_size": 16, "ft_lr": 1e-3, "ft_max_pairs": None}


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import pandas as pd
    from safetensors.torch import load_file
    from pc_clip.core.config import get_config
    from pc_clip.training.finetune import finetune
    from pc_clip.training.state import FinetuneSettings, init_distributed
    from pc_clip.models.clip import create_clip

    rank, world = init_distributed()
    d, epochs, crash_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    emb = load_file(str(d / "emb.safetensors"))["emb"]
    triples = pd.read_csv(d / "triples.csv")
    model, _, tok = create_clip("pc-clip-tiny", seed=0)

    def stop(epoch, logs):
        if epoch == crash_after:
            raise SystemExit(3)  # a kill right after the checkpoint of this epoch

    cfg = get_config("tiny", **json.loads(sys.argv[4]))
    run = finetune(model, tok, triples, FinetuneSettings.from_config(cfg, epochs=epochs), d / "out",
                   image_embeddings=emb, progress=False, on_epoch_end=stop)
    (d / f"rank{rank}.json").write_text(json.dumps(
        {"world": world, "start_epoch": run.start_epoch, "loss": run.steps.loss.tolist(),
         "weight": run.model.transformer.resblocks[1].mlp.c_fc.weight.flatten()[:50].tolist()}))
""")


def _data(n_images=10, n_rows=16):
    rng = np.random.default_rng(0)
    dim = create_clip("pc-clip-tiny", seed=0)[0].text_projection.shape[1]
    emb = F.normalize(torch.tensor(rng.normal(size=(n_images, dim)), dtype=torch.float32), dim=-1)
    words = ["larger", "smaller", "redder", "bluer", "brighter", "darker", "rounder", "taller"]
    rows = [dict(i=i, j=j, text=f"the first object is {words[(3 * i + j) % 8]} than the second")
            for i in range(n_images) for j in range(n_images) if i != j]
    return emb, pd.DataFrame(rows).sample(n_rows, random_state=0).reset_index(drop=True)


def _torchrun(d, epochs, crash_after):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PC_CLIP_RUNS": str(d / "runs")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(d / "worker.py"), str(d), str(epochs), str(crash_after), json.dumps(SETTINGS)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process run killed after epoch 1 (one step: the global batch is the whole data), then resumed to 2
    epochs."""
    d = tmp_path_factory.mktemp("ddp")
    emb, triples = _data()
    save_file({"emb": emb}, str(d / "emb.safetensors"))
    triples.to_csv(d / "triples.csv", index=False)
    (d / "worker.py").write_text(WORKER)
    killed = _torchrun(d, epochs=2, crash_after=1)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    saved = d / "out" / "epochs" / "epoch-001"
    first_step = (load_file(str(saved / "open_clip_model.safetensors")),
                  json.loads((saved / "train_state.json").read_text()))
    resumed = _torchrun(d, epochs=2, crash_after=0)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]
    return d, emb, triples, first_step, ranks


def _single(tmp_path, emb, triples, epochs, monkeypatch):
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    return finetune(model, tok, triples,
                    FinetuneSettings.from_config(get_config("tiny", **SETTINGS), epochs=epochs),
                    tmp_path / f"single{epochs}", image_embeddings=emb, progress=False)


@pytest.mark.slow
def test_two_processes_equal_one_process_step_on_the_global_batch(runs, tmp_path, monkeypatch):
    _, emb, triples, (weights, state), _ = runs
    one = _single(tmp_path, emb, triples, 1, monkeypatch)
    assert len(state["steps"]) == 1 and state["steps"][0]["epoch"] == 1  # one step on all 16 pairs
    assert abs(state["steps"][0]["loss"] - one.steps.loss.iloc[0]) < 1e-5
    ref, base, lr = one.model.state_dict(), create_clip("pc-clip-tiny",
                                                        seed=0)[0].state_dict(), SETTINGS["ft_lr"]
    assert weights.keys() == ref.keys()
    n_full = n_moved = 0
    for k in ref:
        step, diff = (ref[k] - base[k]).abs(), (weights[k] - ref[k]).abs()
        if not step.any():  # frozen (or untouched): identical in both runs
            assert torch.equal(weights[k], ref[k]), k
            continue
        # Adam's first step is lr * g / (|g| + eps): a full step of lr wherever the gradient dominates eps.
        # There both runs must agree within 1e-5. Where |g| is below eps (e.g. the attention key bias, whose
        # gradient is zero in exact arithmetic), float rounding of a near-zero g decides the step;
        # bound it by lr.
        full = step >= 0.9 * lr
        assert diff[full].max() <= 1e-5, (k, float(diff[full].max()))
        assert diff.max() <= lr, (k, float(diff.max()))
        n_full, n_moved = n_full + int(full.sum()), n_moved + step.numel()
    # almost every trained weight took a full step
    assert n_moved and n_full / n_moved > 0.99, n_full / n_moved


@pytest.mark.slow
def test_resumed_two_process_run_continues_from_the_saved_step(runs, tmp_path, monkeypatch):
    d, emb, triples, (_, state), ranks = runs
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["start_epoch"] for r in ranks] == [1, 1]  # both processes resumed after epoch 1
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["weight"] == ranks[1]["weight"]
    assert len(ranks[0]["loss"]) == 2 and ranks[0]["loss"][0] == state["steps"][0]["loss"]
    two = _single(tmp_path, emb, triples, 2, monkeypatch)
    assert np.allclose(ranks[0]["loss"], two.steps.loss.tolist(), atol=1e-5)  # epoch 2 continued the same run
    assert json.loads((d / "out" / "finetune.json").read_text())["n_epochs"] == 2  # rank 0 finished the run


# ---- The fast finetuning paths compute what the plain path computes: fused attention (outputs and
# gradients),

EOT = 999  # the largest id in these token rows: open_clip's argmax pooling finds it


def small_clip(width: int = 32, heads: int = 2, layers: int = 1, context: int = 16,
               seed: int = 0) -> open_clip.CLIP:
    """A CLIP with a small causal text tower (random weights): compiling it on a CPU takes seconds, not
    minutes."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=16,
                           vision_cfg=dict(image_size=8, patch_size=4, width=16, layers=1, head_width=8),
                           text_cfg=dict(context_length=context, vocab_size=EOT + 1, width=width, heads=heads,
                                         layers=layers))
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
    long_tail = ", while the second image shows a bluer vantile in the background"
    texts = [("the first image has a larger glorp" + (long_tail if k % 4 == 0 else "")) for k in range(n)]
    g = torch.Generator().manual_seed(1)
    triples = pd.DataFrame(dict(i=torch.randint(0, 32, (n,), generator=g).tolist(),
                                j=torch.randint(0, 32, (n,), generator=g).tolist(), text=texts))
    emb = torch.nn.functional.normalize(torch.randn(32, model.text_projection.shape[1], generator=g), dim=-1)
    return triples, emb, oc.get_tokenizer("ViT-B-32")


def test_bucketed_and_unbucketed_loss_of_a_fixed_batch_are_equal():
    """A batch padded to its own length (bucketed) and the same batch padded to the full context: the same
    loss."""
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    triples, emb, _ = _mixed_run_data(model)
    data = _prepare(model, tok, triples, FinetuneSettings(), emb, None, False, 1)
    s = FinetuneSettings(batch_size=16, length_buckets=4)
    batches = _batches(data.n, s, 0, 1, data.pool_pos)
    short = min(batches, key=lambda b: int(data.pool_pos[b].max()))  # a bucket of short texts
    # it really pads less than the longest text
    assert int(data.pool_pos[short].max()) < int(data.pool_pos.max())
    args = (data, s, make_clip_loss(), torch.device("cpu"), torch.float32)
    for batch in (short, torch.arange(16)):
        with torch.no_grad():
            own = _step_loss(model, batch, *args)
            full = difference_contrastive_loss(model.encode_text(data.ids[batch]), emb[data.i[batch]],
                                               emb[data.j[batch]])
        torch.testing.assert_close(own, full, rtol=1e-6, atol=1e-6)
    # the same pairs each epoch, once each, and the same batches on every call
    for epoch in (0, 1):
        b = _batches(data.n, s, epoch, 1, data.pool_pos)
        assert torch.equal(torch.cat(b).sort().values, torch.arange(data.n))
        assert all(torch.equal(x, y) for x, y in zip(b, _batches(data.n, s, epoch, 1, data.pool_pos)))


def test_compiled_and_eager_steps_agree():
    """torch.compile of the (fused) text tower: the loss and every gradient of a step match eager, on two
    lengths."""
    torch._dynamo.reset()
    model = small_clip(width=32, heads=2, layers=1)
    t0 = time.perf_counter()
    # a second length: the step recompiles (dynamic) and still agrees
    for lengths in ([3, 16, 9, 5], [4, 6, 2, 7]):
        ids = token_rows(lengths, seed=len(lengths) + lengths[0])
        (fe, ge), (fc, gc) = (features_and_grads(model, ids, True),
                              features_and_grads(model, ids, True, "default"))
        torch.testing.assert_close(fc, fe, rtol=1e-5, atol=1e-5)
        assert_grads_close(gc, ge, rtol=1e-4, atol=1e-5)
    print(f"compiled and checked in {time.perf_counter() - t0:.1f} s")


def test_fast_paths_switch_and_runs_repeat(tmp_path):
    """Off, the step is the plain one (no fused tower); tiny has them on (issue 22); a run with them on
    repeats itself exactly."""
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    triples, emb, _ = _mixed_run_data(model)
    tiny = get_config("tiny")
    assert tiny.ft_fused_attention and tiny.ft_length_buckets == 16 and tiny.ft_compile == "off"
    cfg = get_config("tiny", ft_batch_size=16, ft_fused_attention=False, ft_length_buckets=0)
    s = FinetuneSettings.from_config(cfg)
    data = _prepare(model, tok, triples, s, emb, None, False, 1)
    assert _Objective(model, data, s, make_clip_loss(), torch.device("cpu"), torch.float32)._run[-1] is None
    fast = cfg.replace(ft_fused_attention=True, ft_length_buckets=2)
    runs = [finetune(model, tok, triples, FinetuneSettings.from_config(fast, epochs=2), tmp_path / k,
                     image_embeddings=emb, progress=False)
            for k in "ab"]
    assert runs[0].steps.loss.tolist() == runs[1].steps.loss.tolist()
    assert all(torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))


def test_every_compared_model_gets_the_same_search():
    """Issue 22: the caption baselines and every ablation are tuned on validation like pc-clip, each in its
    own folders."""
    from pc_clip.core.registry import sweep_grid
    from pc_clip.training.plan import candidate_lr
    from pc_clip.training.sweep import swept_models
    cfg = get_config("tiny")
    assert set(swept_models(cfg)) == {"pc-clip", "clip-ft-captions", "clip-ft-rewritten", "pc-clip/mse",
                                      "pc-clip/noise-0.3", "pc-clip/both-towers", "pc-clip/plain-captions"}
    grid = sweep_grid(cfg)
    folders = {model_dir(cfg, n, lr=lr, alpha=a) for n in swept_models(cfg) for lr, a in grid}
    assert len(folders) == len(grid) * len(swept_models(cfg))  # no two candidates share a folder
    paper = get_config("paper")  # no grid: each trains at its own configured rate
    assert candidate_lr(paper, "clip-ft-captions") == paper.caption_ft_lr
    assert candidate_lr(paper, "pc-clip") == paper.ft_lr
    assert "pc-clip/plain-captions" not in swept_models(paper)  # an ablation of the world's captions
