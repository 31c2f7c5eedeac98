"""The complete tiny reproduction, at a reduced size, through the same command a user runs.

Every experiment notebook runs end to end with papermill; the test checks that the results table holds
each task of the paper for the base and the finetuned model, that REPORT.md and the figures exist, and that
a second run reuses the trained checkpoints instead of training again.
"""
import os
import re
import subprocess
import sys
import pandas as pd
import pytest
from pathlib import Path

from conftest import REPO
from pc_clip.core.config import parse_overrides, get_config

from pc_clip.core.run import figures_dir, notebooks_dir, results_path
from pc_clip.core.registry import model_dir

# the experiment notebooks that make a figure, and the figure each one saves (the REPORT shows them all)
FIGURE_NOTEBOOKS = {"01": "pretrain_loss.png", "03": "finetune_loss.png", "04": "difference_classification.png",
                    "05": "zero_shot_accuracy.png", "06": "comparative_alpha.png", "07": "retrieval.png",
                    "08": "geometry.png", "09": "linear_probe.png", "10": "qualitative_pairs.png",
                    "11": "t2i_arithmetic.png", "12": "ablations.png"}


def _outputs(path: Path) -> list[dict]:
    import json
    return [o for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", [])]


def _text(o: dict) -> str:
    return "".join(o.get("text", [])) + "".join(o.get("data", {}).get("text/plain", [])) + "".join(
        o.get("data", {}).get("text/markdown", []))

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
    assert {"world_samples.png", "claims.png", *FIGURE_NOTEBOOKS.values()} <= figures, figures
    for name in figures:  # the REPORT shows every figure of the run
        assert f"figures/{figures_dir(cfg).name}/{name})" in report, f"REPORT.md does not show {name}"

    # the executed notebooks are the paper: every one that makes a figure shows it inline, and their outputs name no
    # folder of this machine and repeat no log line of a reused cache
    executed = {p.name[:2]: p for p in notebooks_dir(cfg).glob("*.ipynb")}
    for number in FIGURE_NOTEBOOKS:
        outputs = _outputs(executed[number])
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{executed[number].name} shows no figure inline"
    for nb in executed.values():
        text = "\n".join(l for o in _outputs(nb) for l in _text(o).splitlines() if "site-packages" not in l)  # (a library's warning names its file)
        for place in (str(tmp_path), str(REPO)):
            assert place not in text, f"{nb.name} prints an absolute path: {[l for l in text.splitlines() if place in l][:3]}"
        reused = [re.sub(r"^\d\d:\d\d:\d\d ", "", l) for l in text.splitlines() if "reusing" in l and "image embeddings" in l]
        assert len(reused) == len(set(reused)), f"{nb.name} repeats: {reused}"

    # the explorer beyond the paper runs headless on the models of this run, with its fixed selection
    r3 = _reproduce(env, "--experiments", "nbs/experiments/beyond", "--only", "16_explorer")
    assert r3.returncode == 0, f"explorer failed:\n{r3.stdout[-3000:]}\n{r3.stderr[-3000:]}"
    explorer = _outputs(notebooks_dir(cfg) / "16_explorer.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in explorer) >= 3  # the pair, the pairs a statement picks, image + text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in explorer)  # the widget, for Lab

    ck = model_dir(cfg, "pc-clip") / "open_clip_model.safetensors"  # the setting chosen on validation
    assert ck.exists(), sorted(p.name for p in ck.parent.parent.iterdir())
    before = ck.stat().st_mtime_ns
    r2 = _reproduce(env, "--only", "01,03")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert ck.stat().st_mtime_ns == before, "a rerun with unchanged inputs must reuse the finetuned checkpoint"
