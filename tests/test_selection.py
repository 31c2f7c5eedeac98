"""The finetuning-strength selection: the rule decides on validation records only, and `pc-clip` is the chosen candidate."""
import ast
import inspect

import numpy as np
import pandas as pd
import pytest
import torch

import pc_clip.training.plan
import pc_clip.training.selection
from pc_clip.core.config import get_config
from pc_clip.core.runtime import result_row
from pc_clip.models.clip import checkpoint_metadata, create_clip, load_clip, model_dir, find_models
from pc_clip.training.selection import (SELECTION_TASK, VAL_METRICS, candidate_config, candidate_table,
    choose_setting, save_chosen, target_check, candidate_folders, read_candidates, write_candidates)
from pc_clip.core.registry import sweep_grid
from pc_clip.smoke.fixtures import temp_workdir

BASE = dict(zip(VAL_METRICS, (0.55, 0.50, 0.78, 0.50, 0.30)))


def _rows(cands: dict, base: bool = True) -> list[dict]:
    "Validation records of clip and of candidates `{(lr, alpha): (diff, held, zs, worst, retrieval) changes}`."
    rows = [dict(model="clip", lr=np.nan, alpha=np.nan, metric=m, value=v) for m, v in BASE.items()] if base else []
    for (lr, a), ch in cands.items():
        rows += [dict(model="pc-clip", lr=lr, alpha=a, metric=m, value=BASE[m] + c) for m, c in zip(VAL_METRICS, ch)]
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
    "selection.py reads no setting back out of a `condition` string: no float(...) of condition_dict anywhere in it."
    tree = ast.parse(inspect.getsource(pc_clip.training.selection))
    parsed = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "float"
              and any(isinstance(a, ast.Call) and getattr(a.func, "id", "") == "condition_dict" for a in ast.walk(n))]
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


def test_no_import_circle_between_selection_and_finetune_plan():
    "finetune_plan (below) never imports selection (above), not even inside a function."
    src = inspect.getsource(pc_clip.training.plan)
    assert "pc_clip.training.selection" not in src and ".selection import" not in src


def test_nothing_feasible_takes_smallest_shortfall_and_says_so():
    table, chosen = choose_setting(candidate_table(pd.DataFrame(_rows({k: CANDS[k] for k in [(1e-3, 1.0), (2e-3, 1.0)]}))))
    assert (chosen.lr, chosen.alpha, bool(chosen.feasible)) == (1e-3, 1.0, False)


def test_missing_base_rows_is_an_error():
    rows = [r for r in _rows(CANDS) if r["model"] != "clip"]
    with pytest.raises(ValueError, match="base model 'clip'"):
        candidate_table(pd.DataFrame(rows))


def test_grid_and_candidate_folders():
    cfg = get_config("tiny", ft_lr_grid=(1e-3, 2e-3), wavg_alpha_grid=(0.5, 1.0))
    assert sweep_grid(cfg) == [(1e-3, 0.5), (1e-3, 1.0), (2e-3, 0.5), (2e-3, 1.0)]
    folders = set(candidate_folders(cfg).values())
    assert len(folders) == 4 and model_dir(cfg, "pc-clip") not in folders  # the chosen copy never overwrites a candidate
    # a run with one learning rate finds the sweep's finetune at that rate
    assert model_dir(get_config("tiny", ft_lr=2e-3), "pc-clip") == candidate_folders(cfg)[(2e-3, 1.0)]
    paper = get_config("paper")
    assert sweep_grid(paper) == [(paper.ft_lr, 1.0)] and list(candidate_folders(paper).values()) == [model_dir(paper, "pc-clip")]


def test_saved_choice_is_what_later_experiments_load_as_pc_clip():
    base, finetuned = create_clip("pc-clip-tiny", seed=0)[0], create_clip("pc-clip-tiny", seed=1)[0]
    with temp_workdir():
        cfg = get_config("tiny", ft_lr_grid=(1e-3, 2e-3), wavg_alpha_grid=(0.25, 1.0))
        save_chosen(base, finetuned, cfg, "pc-clip", 2e-3, 0.25)
        loaded = load_clip(cfg, "pc-clip", "cpu")[0].state_dict()
        key = "transformer.resblocks.0.mlp.c_fc.weight"
        want = torch.lerp(base.state_dict()[key], finetuned.state_dict()[key], 0.25)
        assert torch.allclose(loaded[key], want)
        meta = checkpoint_metadata(model_dir(cfg, "pc-clip"))["selection"]
        assert (meta["lr"], meta["alpha"]) == (2e-3, 0.25)
        assert meta["finetuned"] == model_dir(cfg, "pc-clip", lr=2e-3).name
        (manifest,) = find_models(cfg, "pc-clip", role="pc-clip")  # which folder is pc-clip: its manifest says
        assert manifest["path"] == str(model_dir(cfg, "pc-clip")) and manifest["selection"]["alpha"] == 0.25
        # a one-point grid at alpha 1: the finetune already is pc-clip, nothing is written
        one = cfg.replace(ft_lr=1e-3, ft_lr_grid=(), wavg_alpha_grid=())
        assert save_chosen(base, finetuned, one, "pc-clip", 1e-3, 1.0) is finetuned
        assert not model_dir(one, "pc-clip").exists()


def test_targets_on_test_ignore_validation_rows():
    rows = [result_row("clip", "zero_shot", "world", "accuracy", 0.78, 0, 100),
            result_row("pc-clip", "zero_shot", "world", "accuracy", 0.76, 0, 100),
            result_row("pc-clip", "zero_shot", "world", "accuracy", 0.95, 0, 100, {"split": "val"})]
    t = target_check(pd.DataFrame(rows)).set_index("target")
    assert t.loc["zero-shot accuracy", "met"] == "no" and abs(t.loc["zero-shot accuracy", "change"] + 0.02) < 1e-9
