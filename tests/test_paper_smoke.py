"""The `paper` code path end to end: `pc-clip reproduce --profile paper-smoke`, exactly as a user types it.

The command builds its own stand-ins (a random small CLIP under `weights/<arch>/<tag>/`, a chat LM trained
on the CPU and loaded in 4-bit, a tiny SDXL pipeline, fixtures of the seven data sets in their official
layouts) into `data/paper-smoke/` (git-ignored, kept between runs, so the chat LM is trained once per
checkout) and runs every experiment notebook on them. The test checks that every notebook ran and that the
results table has rows for each paper data set in each task of the paper, for the base and the finetuned
model.
"""
import time
import pandas as pd
import pytest

from conftest import REPO, SMALL_PAPER_SMOKE, p_args, pc_clip
from pc_clip.core.results import read_results
from pc_clip.core.run import notebooks_dir, results_path
from pc_clip.evaluation.runner import read_items
from pc_clip.models.clip import load_clip, load_weights
from pc_clip.report.claims import PAPER_CLAIMS, claim_verdicts, is_world_dataset
from pc_clip.core.config import parse_overrides, get_config
from pc_clip.core.registry import clip_source, model_dir

# which data sets each task of the paper is measured on (the paper's Tables 1-4 and Figures 3-6)
EXPECTED = {
    "difference_classification": {"awa2", "cifar100", "flowers102", "cub"},
    "zero_shot": {"cifar100", "cub", "eurosat", "flowers102", "sun397"},
    "comparative_prompting": {"cifar100"},
    "retrieval": {"coco"},
    "linear_probe": {"cifar100", "cub", "eurosat", "flowers102", "sun397"},
    "geometry": {"coco", "awa2", "cifar100", "flowers102", "cub"},
}
PAPER_DATASETS = {"coco", "cifar100", "cub", "eurosat", "flowers102", "sun397", "awa2"}


@pytest.mark.slow
def test_paper_smoke_reproduction(tmp_path, monkeypatch):
    start = time.perf_counter()
    # the command picks the stand-ins' data root: no PC_CLIP_DATA
    r = pc_clip("reproduce", "--profile", "paper-smoke", *p_args(SMALL_PAPER_SMOKE),
                env={"PC_CLIP_RUNS": str(tmp_path)}, unset=("PC_CLIP_DATA",), timeout=2400)
    print(f"paper-smoke reproduction: {time.perf_counter() - start:.0f} s\n{r.stdout[-2500:]}")
    assert r.returncode == 0, f"paper-smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "time per notebook" in r.stdout

    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    # its own settings: its own results and notebooks
    cfg = get_config("paper-smoke", **parse_overrides(SMALL_PAPER_SMOKE)[0])
    experiments = sorted(p.name for p in (REPO / "nbs" / "experiments").glob("*.ipynb"))
    executed = {p.name for p in notebooks_dir(cfg).glob("*.ipynb")}
    assert set(experiments) <= executed, sorted(set(experiments) - executed)

    results = pd.read_csv(results_path(cfg), keep_default_na=False)
    assert set(results.profile) == {"paper-smoke"}
    for task, datasets in EXPECTED.items():
        rows = results[results.task == task]
        for model in ("clip", "pc-clip"):
            # awa2/attributes is an awa2 task
            found = {d.split("/")[0] for d in rows[rows.model == model].dataset}
            assert datasets <= found, \
                f"{task} / {model}: no rows for {sorted(datasets - found)} (has {sorted(found)})"
    t2i = results[results.task.str.startswith("t2i")]
    assert len(t2i) and {"clip", "pc-clip"} <= set(t2i.model), sorted(set(t2i.model))
    named = {d.split("/")[0] for d in results.dataset}
    assert PAPER_DATASETS <= named, sorted(PAPER_DATASETS - named)
    numbers = results[results.metric.str.contains("accuracy|recall")]
    assert pd.to_numeric(numbers.value).between(0, 1).all()
    assert (results_path(cfg).parent / "REPORT.md").exists()

    # the finetune moved the weights: pc-clip's checkpoint and its text-side numbers differ from clip's
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    monkeypatch.delenv("PC_CLIP_DATA", raising=False)
    # as the command ran it
    cfg = get_config("paper-smoke", n_pairs=64, data_root=str(REPO / "data" / "paper-smoke"))
    base, tuned = (load_clip(**clip_source(cfg, "clip", device="cpu"))[0].state_dict(),
                   load_weights(model_dir(cfg, "pc-clip")))
    assert base.keys() == tuned.keys(), "pc-clip == clip"
    assert any(not (base[k] == tuned[k]).all() for k in base), "pc-clip == clip"
    results = read_results(results_path(cfg))  # numbers as numbers
    diff = results[results.task == "difference_classification"].pivot_table(
        index=["dataset", "condition", "metric"], columns="model", values="value")
    assert (diff["pc-clip"] != diff["clip"]).any(), (
        "every pc-clip difference-classification number equals clip's")

    # the claims: paper data only, and decided wherever this profile measures them
    items = read_items(cfg)
    world = items.dataset.map(is_world_dataset).astype(bool)
    assert world.any()  # experiment 08 measured the Shapes world too ...
    v = claim_verdicts(results, items, PAPER_CLAIMS).set_index("claim")
    only_paper = claim_verdicts(results, items[~world], PAPER_CLAIMS).set_index("claim")
    pd.testing.assert_frame_equal(v, only_paper)  # ... and none of its items entered a claim
    for name in ("difference_classification", "zero_shot", "retrieval", "geometry", "t2i_arithmetic"):
        assert not v.loc[name, "observed"].startswith("not measured"), (name, v.loc[name, "observed"])
    assert v.loc["t2i_arithmetic", "n_items"] > 0 and v.loc["t2i_arithmetic", "cells"] >= 1
    undecided = v[v.observed.str.startswith("not measured")]
    assert all("(" in o for o in undecided.observed), undecided.observed  # each one says why
    report = (results_path(cfg).parent / "REPORT.md").read_text()
    assert "## Departures from the paper" in report and "the generator judges its own differences" in report
    assert "## Warnings of this run" in report
