"""The complete tiny reproduction, at a reduced size, through the same command a user runs.

Every experiment notebook runs end to end with papermill; the test checks that the results table holds
each task of the paper for the base and the finetuned model, that REPORT.md and the figures exist, and that
a second run reuses the trained checkpoints instead of training again.
"""
import os
import subprocess
import sys
import pandas as pd
import pytest
from pathlib import Path

from conftest import REPO
from pc_clip.core.config import parse_overrides, get_config
from pc_clip.models.clip import model_dir
from pc_clip.core.runtime import figures_dir, results_path

SMALL = ["world_n_train=1200", "world_n_test=400", "world_n_val=400", "pretrain_steps=60",
         "n_pairs=1500", "ft_epochs=1", "caption_ft_epochs=1", "eval_seeds=[0]", "eval_n_images=40",
         "comparative_topk=4"]


def _reproduce(env, *extra):
    args = [str(Path(sys.executable).parent / "pc-clip"), "reproduce", "--profile", "tiny"]
    for p in SMALL:
        args += ["-p", p]
    return subprocess.run(args + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def test_tiny_reproduction_end_to_end(tmp_path, monkeypatch):
    env = {**os.environ, "PC_CLIP_RUNS": str(tmp_path)}
    r = _reproduce(env)
    assert r.returncode == 0, f"reproduction failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "time per notebook" in r.stdout and "REPORT.md" in r.stdout

    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    cfg = get_config("tiny", **parse_overrides(SMALL)[0])  # a run with its own settings: its own results folder
    results = pd.read_csv(results_path(cfg))
    assert not results.duplicated(["experiment", "model", "task", "dataset", "condition", "metric", "seed"]).any()
    assert not results["dataset"].astype(str).str.contains("[@=]").any(), "settings belong in the condition column"
    tasks = set(results.task)
    for task in ["pretrain", "difference_classification", "zero_shot", "comparative_prompting", "retrieval",
                 "geometry", "linear_probe", "t2i_arithmetic"]:
        assert task in tasks, f"no {task} rows"
        models = set(results[results.task == task].model)
        assert "clip" in models, (task, models)
        if task != "pretrain":
            assert "pc-clip" in models, (task, models)
    fractions = results[results.metric.str.contains("accuracy|recall|rate")]
    assert fractions.value.between(0, 1).all()

    report = (results_path(cfg).parent / "REPORT.md").read_text()
    assert "The paper's claims" in report and ("| yes |" in report or "| no |" in report)
    figures = {p.name for p in figures_dir(cfg).glob("*.png")}
    assert {"world_samples.png", "finetune_loss.png"} <= figures, figures

    ck = model_dir(cfg, "pc-clip") / "open_clip_model.safetensors"  # the setting chosen on validation
    assert ck.exists(), sorted(p.name for p in ck.parent.parent.iterdir())
    before = ck.stat().st_mtime_ns
    r2 = _reproduce(env, "--only", "01,03")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert ck.stat().st_mtime_ns == before, "a rerun with unchanged inputs must reuse the finetuned checkpoint"
