"""Tests of `pc_clip.studies`: the noise curve, the difference loss during pretraining, the base-capacity
study."""
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch

from conftest import SMALL_CAPACITY, p_args, pc_clip
from pc_clip.studies.noise_curve import (FallibleJudge, false_fraction, judged_triples, noise_model_name,
    noise_training_sets, noisy_differences, paired_gain, pooled_mean, row_items)
from pc_clip.studies.pretrain_difference import (batch_difference_pairs, choose_weight, joint_loss,
    joint_model_name, pretrain_joint)
from pc_clip.core.config import get_config
from pc_clip.core.results import result_row
from pc_clip.evaluation.metrics import outcomes

from pc_clip.training.pretrain import PretrainSettings, pretrain_clip
from pc_clip.world.shapes import build_world, is_heldout_pair
from pc_clip.core.registry import model_dir


# ---- Studies beyond the paper: joint pretraining with the difference loss, and the noise curve with judges.

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return build_world(0, 300, 60, n_val=30)


def test_joint_loss_is_the_clip_loss_at_weight_zero_and_adds_the_weighted_difference_term():
    g = torch.Generator().manual_seed(1)
    img, txt, dtxt = (torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(3))
    scale = torch.tensor(5.0)
    plain = open_clip.ClipLoss()(img, txt, scale)
    first, second = list(range(6)), [1, 2, 3, 4, 5, 0]
    assert torch.equal(joint_loss(img, txt, scale, dtxt, first, second, weight=0.0)["total"], plain)
    one = joint_loss(img, txt, scale, dtxt, first, second, weight=1.0)
    two = joint_loss(img, txt, scale, dtxt, first, second, weight=2.0)
    assert one["difference"] > 0
    assert torch.isclose(two["total"] - one["total"], one["difference"], atol=1e-5)


def test_joint_pretraining_at_weight_zero_trains_exactly_the_clip_model(world):
    cfg = get_config("tiny", pretrain_steps=3, pretrain_batch_size=16)
    ref, _, _ = pretrain_clip(world, PretrainSettings.from_config(cfg), progress=False)
    m0, _, hist = pretrain_joint(world, cfg, 0.0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m0.state_dict().values()))
    m1, _, hist1 = pretrain_joint(world, cfg, 1.0, progress=False)
    assert all(d is not None for d in hist1["difference"])
    assert not torch.equal(m1.state_dict()["text_projection"], ref.state_dict()["text_projection"])


def test_batch_pairs_leave_out_same_species_and_heldout_pairs(world):
    recs = world.records(np.arange(64))
    first, second, texts = batch_difference_pairs(recs, world.heldout_pairs, np.random.default_rng(0))
    assert len(texts) > 20
    for a, b in zip(first, second):
        ca, cb = recs[a]["category"], recs[b]["category"]
        assert ca != cb and not is_heldout_pair(ca, cb, world.heldout_pairs)


def test_noisy_oracle_makes_the_stated_fraction_false(world, runs_dir):
    cfg = get_config("tiny", n_pairs=400)
    for noise in (0.0, 0.3, 1.0):
        recs = noisy_differences(cfg.replace(oracle_noise=noise), world, progress=False)
        assert len(recs) == 400
        assert abs(false_fraction(recs) - noise) < 0.05, (noise, false_fraction(recs))


def test_judges_remove_more_false_than_true_statements(world, runs_dir):
    recs = noisy_differences(get_config("tiny", n_pairs=400, oracle_noise=0.3), world, progress=False)
    n_true = sum(s["true"] for r in recs for s in r["statements"])
    n_false = sum(not s["true"] for r in recs for s in r["statements"])
    perfect, info = judged_triples(recs, FallibleJudge(0.0), progress=False)
    assert (len(perfect), info["false_fraction"]) == (n_true, 0.0)
    kept, info = judged_triples(recs, FallibleJudge(0.2, seed=3), progress=False)
    kept_false = round(info["false_fraction"] * len(kept))
    assert 0 < kept_false / n_false < 0.3 < 0.7 < (len(kept) - kept_false) / n_true < 0.9
    assert abs(info["agreement"] - 0.8) < 0.05


def test_each_noise_rate_and_filter_trains_into_its_own_folder_from_one_base(world, runs_dir):
    cfgs = [get_config("tiny", oracle_noise=n) for n in (0.0, 0.1, 0.3)]
    folders = {model_dir(c, noise_model_name(f)) for c in cfgs for f in ("none", "oracle")}
    assert len(folders) == 6
    assert len({model_dir(c, "clip") for c in cfgs}) == 1
    sets = noise_training_sets(get_config("tiny", n_pairs=200, oracle_noise=0.5), world, [FallibleJudge(0.0)],
                               progress=False)
    assert sets["none"][1]["false_fraction"] > 0.3 and sets["oracle"][1]["false_fraction"] == 0


def _rows(model, hits_by_cell, task="difference_classification", wording="heldout"):
    return [dict(result_row(model, task, cell, "accuracy", float(np.mean(h)), seed, len(h),
                            {"wording": wording}),
                 items=outcomes(np.arange(len(h)), h))
            for cell, h in hits_by_cell.items() for seed in (0, 1)]


def test_pooled_mean_is_the_mean_over_cells_and_the_gain_is_paired():
    a = _rows("a", {"world/size": [1, 1, 1, 1], "world/colour": [0, 0, 1, 1]})
    b = _rows("b", {"world/size": [1, 0, 1, 0], "world/colour": [0, 0, 1, 1]})
    ia, ib = (row_items(r, "difference_classification", "accuracy", wording="heldout") for r in (a, b))
    assert pooled_mean(ia)["value"] == pytest.approx(0.75)
    gain = paired_gain(ia, ib)
    assert gain["value"] == pytest.approx(0.25) and gain["ci_low"] >= 0 and gain["ci_high"] <= 0.5


def test_weight_is_chosen_on_validation_rows_ties_to_the_smaller():
    val = []
    for w, hits in ((0.0, [1, 1, 1, 1]), (0.5, [1, 1, 0, 0]), (1.0, [1, 1, 1, 0]), (2.0, [1, 1, 1, 0])):
        for wording in ("train", "heldout"):
            val += _rows(joint_model_name(w), {"world/size": hits}, wording=wording)
    assert choose_weight(val, [0.0, 0.5, 1.0, 2.0]) == 1.0  # w = 0 is not a candidate; 1 and 2 tie
    with pytest.raises(ValueError, match="no weight above 0"):
        choose_weight(val, [0.0])


# ---- The base-capacity study (issue 29): one base measured end to end on small settings, cached, and the
# rule.

def _small_capacity_config(runs):
    return get_config("tiny", runs_root=str(runs), world_n_train=256, world_n_test=32, world_n_val=96,
                      n_pairs=200, ft_batch_size=32, ft_epochs=1, eval_n_images=24, eval_seeds=(0,),
                      ft_lr_grid=(1e-3,), wavg_alpha_grid=(0.5, 1.0))


def test_capacity_study_measures_a_base_end_to_end_caches_it_and_tidies_it(tmp_path, monkeypatch):
    from pc_clip.studies.capacity import (Base, capacity_rows, capacity_summary, measure_base,
        measurement_path, run_capacity_study)
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    cfg = _small_capacity_config(tmp_path)
    base = Base("tiny", "pc-clip-tiny", 32)  # the first tiny base, at the small config's 4 pretraining steps
    m = measure_base(cfg, base, threads=1, progress=False, reference_steps=4)
    assert measurement_path(cfg, base, 1, 4).exists()
    assert {p["attribute"] for p in m["probes"]} == {"category", "size", "brightness", "colour", "count"}
    cells = {c["cell"] for c in m["ceiling"]}
    assert "world/size|wording=train" in cells and "world/count|wording=heldout" in cells
    front = pd.DataFrame(m["front"])
    assert {"training wordings", "held-out wordings"} <= set(front["cell"])
    assert (front["ci_low"] <= front["gain"] + 1e-9).all()
    assert (front["gain"] <= front["ci_high"] + 1e-9).all()
    assert m["pretrain_gflop"] == pytest.approx(m["step_gflop"] * 4)
    assert m["steps"] == 4  # the small study's reference budget
    # a second call reads the cache: the same numbers, no training
    again = measure_base(cfg, base, threads=1, progress=False, reference_steps=4)
    assert again == m
    # another seed is another measurement (its own world and base)
    assert measurement_path(cfg.replace(seed=1), base, 1, 4) != measurement_path(cfg, base, 1, 4)
    tidy = run_capacity_study(cfg, [base], seeds=(0,), threads=1, progress=False, reference_steps=4)
    assert set(tidy["kind"]) >= {"cost", "base", "probe", "ceiling", "unconstrained"}
    s = capacity_summary(tidy)
    # the first tiny base: the last measured run
    assert s.loc["tiny", "estimated_run_s"] == pytest.approx(386.0)
    rows = capacity_rows(tidy)
    assert all(r["task"] == "capacity" and "split=val" in r["condition"] for r in rows)


@pytest.mark.slow
def test_capacity_study_notebook_runs_through_the_cli_on_small_settings(tmp_path):
    """Experiment 15c, the study's one command, on two small bases: its rows, its figure and the rule's
    outcome."""
    r = pc_clip("reproduce", "--profile", "tiny", "--experiments", "nbs/experiments/beyond", "--only", "15c",
                "--quiet", *p_args(SMALL_CAPACITY), env={"PC_CLIP_RUNS": str(tmp_path)}, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = pd.concat([pd.read_csv(p) for p in tmp_path.rglob("results.csv")])
    study = results[results["task"] == "capacity"]
    assert {c.split("base=")[1].split(";")[0] for c in study["condition"]} == {"tiny", "48px"}
    assert list(tmp_path.rglob("capacity_study.png"))
    nb = next(tmp_path.rglob("15c_capacity.ipynb")).read_text()
    assert "Chosen base:" in nb
