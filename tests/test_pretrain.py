"""Pretraining the tiny base model: a fixed number of steps, nothing read from the clock, bit-identical weights."""
import time

import pytest
import torch

from pc_clip.core.config import get_config
from pc_clip.models.clip import is_checkpoint, model_dir
from pc_clip.training.pretrain import (PRETRAIN_THREADS, pretrain_clip, pretrain_fingerprint, pretrain_or_load,
    warmup_cosine)
from pc_clip.world.shapes import build_world, make_world


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
    m_fast, _, h_fast = pretrain_clip(small_world, cfg, device="cpu", progress=False, threads=2)
    m_slow, _, h_slow = pretrain_clip(small_world, cfg, device="cpu", progress=False, threads=2, on_step=slow_step)
    assert slept == [0, 1, 2, 3] and h_slow["seconds"] >= 1.0  # really slowed down, after every step ...
    assert h_fast["steps"] == h_slow["steps"] == 4 and h_slow["loss"] == h_fast["loss"]
    assert h_slow["lr"] == h_fast["lr"] and h_fast["lr"][-1] == pytest.approx(cfg.pretrain_lr * warmup_cosine(3, 4))
    assert _same_weights(m_fast, m_slow)  # ... and still bit-identical
    assert torch.get_num_threads() == before  # the caller's thread count is restored


def test_caller_thread_setting_does_not_change_weights(small_world):
    "The thread count is fixed inside the call, so the caller's own `torch.set_num_threads` does not matter."
    cfg = _cfg()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        m1, _, _ = pretrain_clip(small_world, cfg, device="cpu", progress=False, threads=1)
        torch.set_num_threads(1)
        m2, _, h2 = pretrain_clip(small_world, cfg, device="cpu", progress=False, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert h2["threads"] == 1 and _same_weights(m1, m2)
    assert PRETRAIN_THREADS == 2  # the default: fixed, whatever the caller set


def test_fingerprint_covers_the_settings_that_change_weights(small_world):
    cfg = _cfg()
    fp = pretrain_fingerprint(cfg, small_world)
    changed = [cfg.replace(pretrain_steps=7), cfg.replace(pretrain_lr=2e-3), cfg.replace(pretrain_batch_size=16),
               cfg.replace(seed=1)]
    fps = {fp} | {pretrain_fingerprint(c, small_world) for c in changed}
    fps |= {pretrain_fingerprint(cfg, small_world, threads=1), pretrain_fingerprint(cfg, small_world, warmup=0.2),
            pretrain_fingerprint(cfg, small_world, weight_decay=0.0)}
    assert len(fps) == 8


def test_pretrain_then_reuse_checkpoint(runs_dir):
    "The base model is trained once, saved, and reloaded bit-identically; other steps train another model."
    cfg = _cfg(world_n_train=256, world_n_test=32, world_n_val=32)
    world = make_world(cfg)
    m1, _, h1, reused1 = pretrain_or_load(world, cfg, device="cpu", progress=False, threads=1)
    m2, _, h2, reused2 = pretrain_or_load(world, cfg, device="cpu", progress=False, threads=1)
    assert (reused1, reused2) == (False, True) and h1["steps"] == 6 and h2["loss"] == h1["loss"]
    folder = model_dir(cfg, "clip")
    assert is_checkpoint(folder) and folder.is_relative_to(runs_dir)
    assert _same_weights(m1, m2)
    _, _, h3, reused3 = pretrain_or_load(world, cfg.replace(pretrain_steps=3), device="cpu", progress=False, threads=1)
    assert not reused3 and h3["steps"] == 3
