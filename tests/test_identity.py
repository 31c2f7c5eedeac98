"""Change a setting and rerun: every model and every row knows the settings that made it.

- `-p ft_lr=X` (one learning rate, no sweep) trains and evaluates the same folders (it used to train into one hash
  and evaluate another, and evaluate no finetuned model);
- a run with other settings never touches the default run's rows or executed notebooks;
- a failed experiment leaves the earlier rows as they were;
- the model called `pc-clip` is found from the manifests alone;
- one extra registry entry is trained, evaluated and reported with no other edit;
- a damaged base checkpoint is rebuilt, as a finetuned one is.
"""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from conftest import REPO
from pc_clip.core import registry as registry
from pc_clip.core.config import parse_overrides
from pc_clip.core.config import get_config
from pc_clip.core.runtime import notebooks_dir, read_results, result_row, results_path, write_results
from pc_clip.evaluation.runner import (evaluated_models, items_path, read_items, run_zero_shot, eval_datasets,
    write_evaluation)
from pc_clip.models.clip import (WEIGHTS_FILE, create_clip, find_models, is_checkpoint, load_clip, model_dir,
    save_checkpoint)
from pc_clip.core.registry import ModelSpec, model_names

# a world and budgets small enough for a CPU test; everything else is the tiny profile
SMALL = ["world_n_train=300", "world_n_test=150", "world_n_val=150", "pretrain_steps=20", "n_pairs=200",
         "ft_batch_size=32", "caption_ft_batch_size=32", "eval_seeds=[0]", "eval_n_images=20", "comparative_topk=4"]


def _pc_clip(env, *args, timeout=1200):
    exe = Path(sys.executable).parent / "pc-clip"
    return subprocess.run([str(exe), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _small(*extra):
    return [a for p in SMALL for a in ("-p", p)] + list(extra)


def test_one_learning_rate_trains_and_evaluates_the_same_folders(tmp_path, monkeypatch):
    env = {**os.environ, "PC_CLIP_RUNS": str(tmp_path)}
    r = _pc_clip(env, "reproduce", "--only", "01,02", *_small())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = _pc_clip(env, "reproduce", "--only", "03,04", *_small("-p", "ft_lr=1e-3"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    cfg = get_config("tiny", ft_lr=1e-3, **parse_overrides(SMALL)[0])
    rows = read_results(cfg)
    evaluated = set(rows[rows.experiment == "04_difference_classification"].model)
    assert evaluated == set(model_names(cfg)), sorted(set(model_names(cfg)) - evaluated)  # every finetuned model
    assert len(evaluated) == 8
    assert not (tmp_path / "results" / "tiny" / "results.csv").exists() or "04_difference_classification" not in set(
        read_results(tmp_path / "results" / "tiny" / "results.csv").experiment)  # not the default run's table

    # which folder is pc-clip, at which lr, trained on which file: the manifests alone say
    manifests = [json.loads(p.read_text()) | {"path": p.parent} for p in (tmp_path / "runs" / "tiny" / "models").glob("*/manifest.json")]
    (chosen,) = [m for m in manifests if m["name"] == "pc-clip" and m["role"] == "pc-clip"]
    assert chosen["path"] == model_dir(cfg, "pc-clip") and chosen["selection"]["lr"] == 1e-3
    assert chosen["weights_sha256"] == hashlib.sha256((chosen["path"] / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert chosen["data_sha256"] == hashlib.sha256(Path(chosen["data_file"]).read_bytes()).hexdigest()
    assert chosen["settings"]["ft_lr"] == 1e-3 and chosen["parent"] == model_dir(cfg, "clip").name
    r = _pc_clip(env, "models", "--name", "pc-clip", timeout=300)
    assert r.returncode == 0 and str(model_dir(cfg, "pc-clip")) in r.stdout and "lr=0.001" in r.stdout, r.stdout + r.stderr


def _notebook(path: Path, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "tiny"\nseed = 0\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


WRITER = ("from pc_clip.core import get_config, result_row, write_results\n"
          "cfg = get_config(profile, seed=seed, **overrides)\n"
          "rows = [result_row('pc-clip', 'zero_shot', 'world', 'accuracy', 0.5 + 0.1 * len(cfg.eval_seeds), s, 10)\n"
          "        for s in cfg.eval_seeds]\n"
          "{fail}write_results(rows, cfg, '05_zero_shot')\n"
          "print(cfg.eval_seeds)")


def test_other_settings_leave_the_default_rows_and_notebooks_byte_identical(tmp_path):
    exp = tmp_path / "exp"; exp.mkdir()
    _notebook(exp / "05_zero_shot.ipynb", WRITER.format(fail=""))
    env = {**os.environ, "PC_CLIP_RUNS": str(tmp_path / "out")}
    r = _pc_clip(env, "reproduce", "--experiments", str(exp))
    assert r.returncode == 0, r.stderr[-2000:]
    default_csv = tmp_path / "out" / "results" / "tiny" / "results.csv"
    default_nb = tmp_path / "out" / "runs" / "tiny" / "notebooks" / "05_zero_shot.ipynb"
    before = default_csv.read_bytes(), default_nb.read_bytes()

    r = _pc_clip(env, "reproduce", "--experiments", str(exp), "-p", "eval_seeds=(0, 1)")  # a tuple, as a user types it
    assert r.returncode == 0, r.stderr[-2000:]
    assert (default_csv.read_bytes(), default_nb.read_bytes()) == before
    other = get_config("tiny", eval_seeds=(0, 1))
    mine = read_results(tmp_path / "out" / "results" / f"tiny-{other_id(other)}" / "results.csv")
    assert sorted(mine.seed) == [0, 1] and (mine.value == 0.7).all()  # the tuple arrived as a tuple
    assert (tmp_path / "out" / "runs" / "tiny" / f"notebooks-{other_id(other)}" / "05_zero_shot.ipynb").exists()
    assert json.loads((mine_dir := tmp_path / "out" / "results" / f"tiny-{other_id(other)}").joinpath("run.json").read_text())[
        "changed"] == {"eval_seeds": [0, 1]}

    r = _pc_clip(env, "reproduce", "--experiments", str(exp))  # the default again: the same rows
    assert r.returncode == 0 and default_csv.read_bytes() == before[0]


def other_id(cfg):
    from pc_clip.core.runtime import run_id
    return run_id(cfg)


def test_a_failed_experiment_keeps_the_earlier_rows(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    _notebook(exp / "05_zero_shot.ipynb", WRITER.format(fail=""))
    env = {**os.environ, "PC_CLIP_RUNS": str(runs_dir)}
    assert _pc_clip(env, "reproduce", "--experiments", str(exp)).returncode == 0
    table = results_path(get_config("tiny"))
    before = table.read_bytes()
    _notebook(exp / "05_zero_shot.ipynb", WRITER.format(fail="raise RuntimeError('the models were not found')\n"))
    r = _pc_clip(env, "reproduce", "--experiments", str(exp))
    assert r.returncode == 1 and "the models were not found" in r.stderr
    assert table.read_bytes() == before
    # in the library too: a row the table refuses stops write_evaluation before either file changes
    cfg = get_config("tiny")
    good = [dict(result_row("clip", "zero_shot", "world", "accuracy", 0.5, 0, 2),
                 items=pd.DataFrame({"item": ["a", "b"], "value": [1.0, 0.0], "weight": 1.0, "group": "x"}))]
    write_evaluation(good, cfg, "toy")
    files = table.read_bytes(), items_path(cfg, "toy").read_bytes()
    bad = [dict(good[0], value=55.0)]  # a percentage
    with pytest.raises(ValueError, match="fractions|fraction metrics"):
        write_evaluation(bad, cfg, "toy")
    assert (table.read_bytes(), items_path(cfg, "toy").read_bytes()) == files


def _toy_world_run(cfg):
    "A random base model as `clip` and oracle differences and rewrites for `cfg`'s small world (experiments 01-02)."
    from pc_clip.differences.records import (differences_path, generate_differences, make_backend, rewrite_captions,
        rewrites_path)
    from pc_clip.differences.pairs import load_corpus, sample_pairs
    save_checkpoint(create_clip("pc-clip-tiny", seed=0)[0], model_dir(cfg, "clip"), "pc-clip-tiny")
    corpus, held_out, world = load_corpus(cfg, "train")
    pairs = sample_pairs(corpus, cfg.n_pairs, cfg.seed, cfg.pair_sampling, held_out)
    for noise in (0.0, registry.NOISE_LEVEL):
        generate_differences(pairs, make_backend(cfg, world, noise=noise), differences_path(cfg, noise=noise), progress=False)
    rewrite_captions(corpus, make_backend(cfg, world), rewrites_path(cfg), progress=False)


@pytest.fixture
def one_more_entry():
    "The registry with one extra entry for the duration of a test (the list every module reads)."
    extra = ModelSpec("pc-clip/tau-0.5", "ablation", "differences",
                      registry._without(registry._DIFFERENCES, "ft_temperature") + ("judge",),
                      finetune={"temperature": 0.5}, chosen=True, note="a sharper difference loss")
    registry.REGISTRY.append(extra)
    try:
        yield extra
    finally:
        registry.REGISTRY.remove(extra)


def test_one_registry_entry_is_trained_evaluated_and_reported(runs_dir, one_more_entry):
    from pc_clip.training.plan import finetuning_inputs
    from pc_clip.report.summary import ablation_models, ablation_table
    from pc_clip.training.selection import finetune_chosen
    cfg = get_config("tiny", world_n_train=60, world_n_test=40, world_n_val=20, n_pairs=40, ft_batch_size=16,
                     caption_ft_batch_size=16, ft_lr=1e-3, eval_n_images=20, eval_seeds=(0,))
    _toy_world_run(cfg)
    inputs = finetuning_inputs(cfg, progress=False)
    models, runs = finetune_chosen(inputs, cfg, 1e-3, 1.0, progress=False)
    assert "pc-clip/tau-0.5" in runs and runs["pc-clip/tau-0.5"].settings.temperature == 0.5  # trained ...
    assert is_checkpoint(model_dir(cfg, "pc-clip/tau-0.5")) and model_dir(cfg, "pc-clip/tau-0.5") != model_dir(cfg, "pc-clip")
    assert find_models(cfg, "pc-clip/tau-0.5")[0]["role"] == "ablation"
    assert "pc-clip/tau-0.5" in evaluated_models(cfg)  # ... evaluated ...
    rows, _ = run_zero_shot(cfg, evaluated_models(cfg), eval_datasets(cfg, "zero_shot"))
    results = write_evaluation(rows, cfg, "05_zero_shot")
    assert "pc-clip/tau-0.5" in set(results.model)
    assert "pc-clip/tau-0.5" in ablation_table(results, ablation_models(cfg)).index  # ... and reported


def test_a_damaged_base_checkpoint_is_rebuilt(runs_dir):
    from pc_clip.training.pretrain import pretrain_or_load
    from pc_clip.world.shapes import make_world
    cfg = get_config("tiny", world_n_train=64, world_n_test=16, world_n_val=16, pretrain_steps=2, pretrain_batch_size=16)
    world = make_world(cfg)
    model, _, _, reused = pretrain_or_load(world, cfg, "cpu", progress=False)
    weights = model_dir(cfg, "clip") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    again, _, _, reused = pretrain_or_load(world, cfg, "cpu", progress=False)
    assert not reused
    loaded = load_clip(cfg, "clip", "cpu")[0]  # intact again, and the same weights (pretraining is seeded)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
