"""The complete tiny reproduction, at a reduced size, through the same command a user runs.

Every experiment notebook runs end to end with papermill; the test checks that the results table holds
each task of the paper for the base and the finetuned model, that REPORT.md and the figures exist, and that
a second run reuses the trained checkpoints instead of training again.
"""
import os
import re
import pandas as pd
import pytest
from pathlib import Path

from conftest import REPO, SMALL_REPRODUCTION, p_args, pc_clip
from pc_clip.core.config import parse_overrides, get_config

from pc_clip.core.run import figures_dir, notebooks_dir, results_path
from pc_clip.core.registry import model_dir

# the experiment notebooks that make a figure, and the figure each one saves (the REPORT shows them all)
FIGURE_NOTEBOOKS = {"01": "pretrain_loss.png", "03": "finetune_loss.png",
                    "04": "difference_classification.png",
                    "05": "zero_shot_accuracy.png", "06": "comparative_alpha.png", "07": "retrieval.png",
                    "08": "geometry.png", "09": "linear_probe.png", "10": "qualitative_pairs.png",
                    "11": "t2i_arithmetic.png", "12": "ablations.png"}


def _outputs(path: Path) -> list[dict]:
    import json
    return [o for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", [])]


def _text(o: dict) -> str:
    return "".join(o.get("text", [])) + "".join(o.get("data", {}).get("text/plain", [])) + "".join(
        o.get("data", {}).get("text/markdown", []))


def _reproduce(env, *extra):
    return pc_clip("reproduce", "--profile", "tiny", *p_args(SMALL_REPRODUCTION, *extra), env=env,
                   timeout=1500)


@pytest.mark.slow
def test_tiny_reproduction_end_to_end(tmp_path, monkeypatch):
    env = {**os.environ, "PC_CLIP_RUNS": str(tmp_path)}
    r = _reproduce(env)
    assert r.returncode == 0, f"reproduction failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "time per notebook" in r.stdout and "REPORT.md" in r.stdout

    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    # a run with its own settings: its own results folder
    cfg = get_config("tiny", **parse_overrides(SMALL_REPRODUCTION)[0])
    results = pd.read_csv(results_path(cfg))
    row_key = ["experiment", "model", "task", "dataset", "condition", "metric", "seed"]
    assert not results.duplicated(row_key).any()
    assert not results["dataset"].astype(str).str.contains("[@=]").any(), \
        "settings belong in the condition column"
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

    # the executed notebooks are the paper: every one that makes a figure shows it inline, and their
    # outputs name no
    # folder of this machine and repeat no log line of a reused cache
    executed = {p.name[:2]: p for p in notebooks_dir(cfg).glob("*.ipynb")}
    for number in FIGURE_NOTEBOOKS:
        outputs = _outputs(executed[number])
        assert any("image/png" in o.get("data", {}) for o in outputs), \
            f"{executed[number].name} shows no figure inline"
    for nb in executed.values():
        # (a library's warning names its file)
        text = "\n".join(l for o in _outputs(nb) for l in _text(o).splitlines() if "site-packages" not in l)
        for place in (str(tmp_path), str(REPO)):
            named = [line for line in text.splitlines() if place in line][:3]
            assert place not in text, f"{nb.name} prints an absolute path: {named}"
        reused = [re.sub(r"^\d\d:\d\d:\d\d ", "", l) for l in text.splitlines()
                  if "reusing" in l and "image embeddings" in l]
        assert len(reused) == len(set(reused)), f"{nb.name} repeats: {reused}"

    # the explorer beyond the paper runs headless on the models of this run, with its fixed selection
    r3 = _reproduce(env, "--experiments", "nbs/experiments/beyond", "--only", "16_explorer")
    assert r3.returncode == 0, f"explorer failed:\n{r3.stdout[-3000:]}\n{r3.stderr[-3000:]}"
    explorer = _outputs(notebooks_dir(cfg) / "16_explorer.ipynb")
    # the pair, the pairs a statement picks, image + text
    assert sum("image/png" in o.get("data", {}) for o in explorer) >= 3
    # the widget, for Lab
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in explorer)

    ck = model_dir(cfg, "pc-clip") / "open_clip_model.safetensors"  # the setting chosen on validation
    assert ck.exists(), sorted(p.name for p in ck.parent.parent.iterdir())
    before = ck.stat().st_mtime_ns
    r2 = _reproduce(env, "--only", "01,03")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert ck.stat().st_mtime_ns == before, \
        "a rerun with unchanged inputs must reuse the finetuned checkpoint"
