"Pure metrics: bootstrap intervals, retrieval, geometry and probes on embeddings with known answers."
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pc_clip.evaluation import metrics as M


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- intervals -----------------------------------------------------------------------------------------------------
def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        x = (rng.random(150) < 0.3).astype(float)
        lo, hi = M.bootstrap_ci(x, n_boot=300, seed=i)
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_weighted_items_reproduce_a_ratio_and_worst_group():
    v, w, g = np.array([1.0, 0.5, 0.0, 1.0]), np.array([2, 4, 1, 1]), np.array([0, 0, 1, 1])
    assert M.statistic_value(v, w) == pytest.approx((2 + 2 + 0 + 1) / 8)
    assert M.statistic_value(v, w, g, "worst_group") == pytest.approx(0.5)
    lo, hi = M.bootstrap_ci(v, w, g, "worst_group", n_boot=200)
    assert 0 <= lo <= hi <= 1


def test_paired_bootstrap_is_deterministic_and_detects_a_real_difference():
    rng = np.random.default_rng(1)
    hard = rng.random(500)
    a, b = (hard < 0.62).astype(float), (hard < 0.6).astype(float)
    r = M.paired_bootstrap(a, b)
    assert r == M.paired_bootstrap(a, b)
    assert r["ci_low"] > 0  # a is never worse on any item: even +0.02 is signal when paired
    unpaired_lo = M.bootstrap_ci(a)[0] - M.bootstrap_ci(b)[1]
    assert unpaired_lo < 0  # ... which unpaired intervals would not show


# --- retrieval ---------------------------------------------------------------------------------------------------
def test_perfect_retrieval_with_several_captions_per_image():
    img = _unit(40, 32, 0)
    owner = np.repeat(np.arange(40), 5)  # five captions per image, as on COCO
    txt = F.normalize(img[owner] + 0.05 * _unit(200, 32, 1), dim=-1)
    rec = M.retrieval(img, txt, owner)
    assert {k: v for k, v in rec.items() if k != "outcomes"} == {f"recall@{k}_{d}": 1.0 for k in (1, 5, 10) for d in ("i2t", "t2i")}


def test_retrieval_counts_any_caption_and_is_chunk_invariant():
    img = torch.eye(4)
    # image 0's first caption points at image 1, its second at itself: i2t still finds image 0 at rank 1
    txt = torch.stack([img[1], img[0], img[1], img[2], img[3]])
    owner = np.array([0, 0, 1, 2, 3])
    rec = M.retrieval(img, txt, owner, ks=(1,), chunk=2)
    assert rec["recall@1_i2t"] == 1.0
    assert rec["recall@1_t2i"] == pytest.approx(4 / 5)  # the stray caption retrieves image 1 first
    big_img, big_txt = _unit(50, 16, 2), _unit(120, 16, 3)
    big_owner = np.arange(120) % 50
    drop = lambda r: {k: v for k, v in r.items() if k != "outcomes"}
    assert drop(M.retrieval(big_img, big_txt, big_owner, chunk=7)) == drop(M.retrieval(big_img, big_txt, big_owner))


def test_random_retrieval_is_near_chance_and_outcomes_make_the_recalls():
    img, txt = _unit(200, 64, 4), _unit(1000, 64, 5)
    rec = M.retrieval(img, txt, np.arange(1000) % 200)
    assert rec["recall@10_t2i"] == pytest.approx(10 / 200, abs=0.03)
    for m, o in rec["outcomes"].items():
        assert len(o) == (200 if m.endswith("i2t") else 1000) and o.value.mean() == rec[m]


def test_retrieval_rejects_captions_without_images():
    with pytest.raises(ValueError, match="index the 3 images"):
        M.retrieval(torch.eye(3), torch.eye(3), [0, 1, 5])
    with pytest.raises(ValueError, match="at least one caption"):
        M.retrieval(torch.eye(3), torch.eye(3)[:2], [0, 1])


# --- geometry ----------------------------------------------------------------------------------------------------
def test_exact_offsets_solve_every_analogy_and_identical_directions_are_consistent():
    base = torch.randn(12, 24, generator=torch.Generator().manual_seed(0))
    offset = 2.0 * _unit(1, 24, 1)
    emb = torch.cat([base, base + offset])
    quads = M.analogy_quadruples(np.arange(12), np.arange(12) + 12)
    assert M.analogy_hits(emb, quads).mean() == 1.0
    assert M.directional_consistency(M.difference_vectors(emb, np.arange(12) + 12, np.arange(12))) == pytest.approx(1.0, abs=1e-5)
    assert M.text_direction_cosines(offset, emb[12:] - emb[:12])[0] == pytest.approx(1.0, abs=1e-5)
    assert M.text_direction_cosines(-offset, emb[12:] - emb[:12])[0] == pytest.approx(-1.0, abs=1e-5)


def test_analogy_excludes_the_query_images():
    # c itself would be the nearest candidate to a - b + c when the offset is tiny; it must not count
    base = _unit(6, 8, 2)
    emb = torch.cat([base, F.normalize(base + 1e-3, dim=-1)])
    quads = M.analogy_quadruples(np.arange(6), np.arange(6) + 6)
    assert M.analogy_hits(emb, quads).mean() == 1.0


def test_random_directions_are_not_consistent():
    assert M.directional_consistency(torch.randn(300, 128, generator=torch.Generator().manual_seed(3))) < 0.02
    with pytest.raises(ValueError, match="at least 2"):
        M.directional_consistency(torch.randn(1, 4))


# --- linear probes -----------------------------------------------------------------------------------------------
def test_probe_chooses_C_on_validation_and_scores_test_once():
    rng = np.random.default_rng(0)
    y_tr, y_va, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    centres = 6 * rng.normal(size=(4, 16))
    feat = lambda y: centres[y] + rng.normal(size=(len(y), 16)) * 0.2
    r = M.linear_probe(feat(y_tr), y_tr, feat(y_va), y_va, feat(y_te), y_te, Cs=(1.0, 0.01))
    assert r["accuracy"] == 1.0 and set(r["validation"]) == {0.01, 1.0} and r["C"] == M.best_on_validation(r["validation"])
    assert len(r["outcomes"]["accuracy"]) == 100
    # validation labels that are noise: the choice follows them, the test score does not see them
    noisy = M.linear_probe(feat(y_tr), y_tr, feat(y_va), rng.integers(0, 4, 100), feat(y_te), y_te, Cs=(0.01, 1.0))
    assert noisy["validation"][0.01] < 0.6 and noisy["accuracy"] > 0.9


