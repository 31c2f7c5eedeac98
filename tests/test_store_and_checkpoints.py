"""Results-table idempotence, checkpoint round trip (the store's tests are in test_store.py)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from pc_clip.core.config import get_config
from pc_clip.core.runtime import read_results, result_row, write_results
from pc_clip.models.clip import TINY_MODEL, create_clip, load_checkpoint, save_checkpoint

def test_results_table_is_idempotent_per_experiment(runs_dir):
    cfg = get_config("tiny")
    rows = [result_row("clip", "zero_shot", "world", "accuracy", 0.5, 0, 10)]
    write_results(rows, cfg, "e1"); write_results(rows, cfg, "e1")
    write_results([result_row("pc-clip", "zero_shot", "world", "accuracy", 0.6, 0, 10)], cfg, "e2")
    t = read_results(cfg)
    assert len(t) == 2 and set(t.experiment) == {"e1", "e2"}


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    model, _, tok = create_clip(TINY_MODEL, seed=3)
    with torch.no_grad():
        model.text_projection.add_(1.0)  # something a fresh model would not have
    save_checkpoint(model, tmp_path / "ck", TINY_MODEL, {"step": 5})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    m2, _, tok2 = load_checkpoint(tmp_path / "ck")
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_image(x), m2.encode_image(x))
    assert torch.equal(tok(["a glorp"]), tok2(["a glorp"]))
