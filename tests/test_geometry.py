"""Retrieval, geometry and linear probes: known answers on synthetic embeddings, controlled world pairs, and the
runners end to end on stand-in models (a random tiny CLIP saved under the names an experiment looks for)."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pc_clip import geometry as G
from pc_clip.core import get_config, read_results, write_results
from pc_clip.world import ATTRIBUTE_KINDS, build_world, difference_direction


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- retrieval ---------------------------------------------------------------------------------------------------
def test_perfect_retrieval_with_several_captions_per_image():
    img = _unit(40, 32, 0)
    owner = np.repeat(np.arange(40), 5)  # five captions per image, as on COCO
    txt = F.normalize(img[owner] + 0.05 * _unit(200, 32, 1), dim=-1)
    rec = G.retrieval_recalls(img, txt, owner)
    assert rec == {f"recall@{k}_{d}": 1.0 for k in (1, 5, 10) for d in ("i2t", "t2i")}


def test_retrieval_counts_any_caption_and_is_chunk_invariant():
    img = torch.eye(4)
    # image 0's first caption points at image 1, its second at itself: i2t still finds image 0 at rank 1
    txt = torch.stack([img[1], img[0], img[1], img[2], img[3]])
    owner = np.array([0, 0, 1, 2, 3])
    rec = G.retrieval_recalls(img, txt, owner, ks=(1,), chunk=2)
    assert rec["recall@1_i2t"] == 1.0
    assert rec["recall@1_t2i"] == pytest.approx(4 / 5)  # the stray caption retrieves image 1 first
    big_img, big_txt = _unit(50, 16, 2), _unit(120, 16, 3)
    big_owner = np.arange(120) % 50
    assert G.retrieval_recalls(big_img, big_txt, big_owner, chunk=7) == G.retrieval_recalls(big_img, big_txt, big_owner)


def test_random_retrieval_is_near_chance_and_rows_are_fractions(runs_dir):
    img, txt = _unit(200, 64, 4), _unit(1000, 64, 5)
    rows = G.retrieval_rows(img, txt, np.arange(1000) % 200, "clip", "toy", seed=0)
    vals = {r["metric"]: r["value"] for r in rows}
    assert vals["recall@10_t2i"] == pytest.approx(10 / 200, abs=0.03)
    assert {r["n"] for r in rows if r["metric"].endswith("t2i")} == {1000}
    write_results(rows, get_config("tiny"), "test")  # the results-table contract accepts them
    assert len(read_results(get_config("tiny"))) == 6


def test_retrieval_rejects_captions_without_images():
    with pytest.raises(ValueError, match="index the 3 images"):
        G.retrieval_recalls(torch.eye(3), torch.eye(3), [0, 1, 5])
    with pytest.raises(ValueError, match="at least one caption"):
        G.retrieval_recalls(torch.eye(3), torch.eye(3)[:2], [0, 1])


# --- geometry ----------------------------------------------------------------------------------------------------
def test_exact_offsets_solve_every_analogy_and_identical_directions_are_consistent():
    base = torch.randn(12, 24, generator=torch.Generator().manual_seed(0))
    offset = 2.0 * _unit(1, 24, 1)
    emb = torch.cat([base, base + offset])
    quads = G.analogy_quadruples(np.arange(12), np.arange(12) + 12)
    assert G.analogy_accuracy(emb, quads) == 1.0
    assert G.directional_consistency(G.difference_vectors(emb, np.arange(12) + 12, np.arange(12))) == pytest.approx(1.0, abs=1e-5)
    assert G.text_direction_cosine(offset, emb[12:] - emb[:12]) == pytest.approx(1.0, abs=1e-5)
    assert G.text_direction_cosine(-offset, emb[12:] - emb[:12]) == pytest.approx(-1.0, abs=1e-5)


def test_analogy_excludes_the_query_images():
    # c itself would be the nearest candidate to a - b + c when the offset is tiny; it must not count
    base = _unit(6, 8, 2)
    emb = torch.cat([base, F.normalize(base + 1e-3, dim=-1)])
    quads = G.analogy_quadruples(np.arange(6), np.arange(6) + 6)
    assert G.analogy_accuracy(emb, quads) == 1.0


def test_random_directions_are_not_consistent():
    assert G.directional_consistency(torch.randn(300, 128, generator=torch.Generator().manual_seed(3))) < 0.02
    with pytest.raises(ValueError, match="at least 2"):
        G.directional_consistency(torch.randn(1, 4))


@pytest.fixture(scope="module")
def world():
    return build_world(0, 300, 300)


def test_controlled_pairs_differ_in_exactly_the_edited_attribute(world):
    cp = G.controlled_pairs(world, n_per_edit=10, seed=1)
    recs = cp.records()
    assert cp.pairs["edit"].value_counts().to_dict() == {e: 10 for e in G.EDITS}
    for p in cp.pairs.itertuples():
        changed = [k for k in ATTRIBUTE_KINDS if difference_direction(recs[p.edited], recs[p.base], k) is not None]
        assert changed == [G.EDITS[p.edit].attribute], (p.edit, changed)
    # a background edit leaves the object's pixels alone: pixels that stay put are most of the image for large objects
    snow = cp.pairs[cp.pairs.edit == "snowier"].iloc[0]
    same = (cp.images[snow.edited] == cp.images[snow.base]).all(-1)
    assert 0 < same.mean() < 1
    again = G.controlled_pairs(world, n_per_edit=10, seed=1)
    assert np.array_equal(again.images, cp.images)  # seeded


def test_geometry_rows_on_pixels(world):
    cp = G.controlled_pairs(world, n_per_edit=12, seed=0)
    pix = F.normalize(torch.as_tensor(cp.images.reshape(len(cp.images), -1), dtype=torch.float32), dim=-1)
    text = torch.stack([pix[p.edited] - pix[p.base] for p in cp.pairs.itertuples()])
    rows = G.geometry_rows(pix, text, cp, "pixels", seed=0, n_quads=100)
    df = pd.DataFrame(rows)
    assert set(df.dataset) == {"world"} | {f"world/{e}" for e in G.EDITS}
    assert df[~df.metric.str.startswith("text_direction_cosine")].value.between(0, 1).all()
    assert len(G.edit_statements(cp)) == len(cp.pairs)
    with pytest.raises(ValueError, match="embed cp.images"):
        G.geometry_rows(pix[:-1], None, cp, "pixels")


# --- linear probes -----------------------------------------------------------------------------------------------
def test_probe_on_separable_features_is_perfect_and_identical_features_are_fitted_once(monkeypatch):
    rng = np.random.default_rng(0)
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
    centres = 6 * rng.normal(size=(4, 16))
    x_tr, x_te = centres[y_tr] + rng.normal(size=(400, 16)) * 0.2, centres[y_te] + rng.normal(size=(100, 16)) * 0.2
    calls = []
    real = G.linear_probe
    monkeypatch.setattr(G, "linear_probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = G.linear_probe_rows({"clip": (x_tr, x_te), "pc-clip": (x_tr.copy(), x_te.copy()),
                                "noise": (rng.normal(size=(400, 16)), rng.normal(size=(100, 16)))},
                               {"toy": (y_tr, y_te)}, progress=False)
    vals = {r["model"]: r["value"] for r in rows}
    assert vals["clip"] == vals["pc-clip"] == 1.0
    assert vals["noise"] < 0.5
    assert len(calls) == 2  # clip and pc-clip share one fit


# --- the runners, end to end on stand-in models ---------------------------------------------------------------------
def test_runners_end_to_end_on_stand_in_models(runs_dir, capsys):
    from pc_clip.models import create_clip, model_dir, save_checkpoint
    cfg = get_config("tiny", world_n_train=200, world_n_test=120)
    a, _, _ = create_clip("pc-clip-tiny", seed=0)
    b, _, _ = create_clip("pc-clip-tiny", seed=1)
    save_checkpoint(a, model_dir(cfg, "clip"), "pc-clip-tiny")
    save_checkpoint(a, model_dir(cfg, "pc-clip"), "pc-clip-tiny")
    with torch.no_grad():  # a text-only change: image numbers must stay identical, text numbers must move
        a.transformer.resblocks[-1].mlp.c_proj.weight.add_(0.5 * torch.randn_like(a.transformer.resblocks[-1].mlp.c_proj.weight))
    save_checkpoint(a, model_dir(cfg, "pc-clip/mse"), "pc-clip-tiny")
    save_checkpoint(b, model_dir(cfg, "pc-clip/both-towers"), "pc-clip-tiny")
    names = ["clip", "pc-clip", "pc-clip/mse", "pc-clip/both-towers", "clip-ft-captions"]
    rr = pd.DataFrame(G.run_retrieval(cfg, names, n_images=60, n_captions=3, progress=False))
    gr = pd.DataFrame(G.run_geometry(cfg, names, n_per_edit=6, n_quads=30, progress=False))
    pr = pd.DataFrame(G.run_linear_probe(cfg, names, max_train=150, progress=False))
    assert "skipping model clip-ft-captions" in capsys.readouterr().out
    for df in (rr, gr, pr):
        assert set(df.model) == set(names[:4])
    val = lambda df, m, metric, ds="world": df[(df.model == m) & (df.metric == metric) & (df.dataset == ds)].value.item()
    assert (pr[pr.model == "pc-clip/mse"].value.to_numpy() == pr[pr.model == "clip"].value.to_numpy()).all()
    assert val(gr, "pc-clip/mse", "analogy_accuracy") == val(gr, "clip", "analogy_accuracy")
    assert val(gr, "pc-clip/mse", "text_direction_cosine") != val(gr, "clip", "text_direction_cosine")
    assert val(gr, "pc-clip", "text_direction_cosine") == val(gr, "clip", "text_direction_cosine")
    assert rr[rr.model == "clip"].n.max() == 180  # 60 images x 3 captions
    s = G.direction_summary(pd.concat([rr.assign(task="retrieval")]), "retrieval", ["recall@5_i2t"], "pc-clip", "clip")
    assert s.endswith("(same)")


def test_retrieval_runner_reads_coco_on_paper_style_configs(runs_dir, tmp_path, monkeypatch):
    "With corpus='coco' the runner reads COCO val from the data root (a fixture here) with its own captions."
    from pc_clip.data import load_coco, make_fixture
    from pc_clip.models import create_clip, model_dir, save_checkpoint
    make_fixture("coco", tmp_path / "data")
    monkeypatch.setenv("PC_CLIP_DATA", str(tmp_path / "data"))
    cfg = get_config("tiny", corpus="coco")
    model, _, _ = create_clip("pc-clip-tiny", seed=0)
    save_checkpoint(model, model_dir(cfg, "clip"), "pc-clip-tiny")
    rows = G.run_retrieval(cfg, ["clip"], progress=False)
    coco = load_coco(tmp_path / "data", "val")
    n_captions = sum(len(c) for c in coco.captions)
    assert {r["dataset"] for r in rows} == {"coco"} and len(rows) == 6
    assert {r["n"] for r in rows} == {len(coco), n_captions}
    assert all(r["value"] == 1.0 for r in rows if r["metric"].startswith("recall@10"))  # fewer candidates than k
