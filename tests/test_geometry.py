"""Retrieval, geometry and linear probes: known answers on synthetic embeddings, controlled world pairs, and the
runners end to end on stand-in models (a random tiny CLIP saved under the names an experiment looks for)."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pc_clip.evaluation import runner as E
from pc_clip.evaluation import geometry as G
from pc_clip.evaluation.metrics import geometry
from pc_clip.core.config import get_config
from pc_clip.core.runtime import read_results, write_results
from pc_clip.world.oracle import ATTRIBUTE_KINDS, difference_direction
from pc_clip.world.shapes import build_world


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def world():
    return build_world(0, 300, 300, n_val=50)


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
    res = geometry(pix, cp.pairs, text, n_quads=100)
    assert set(res) == {"all"} | set(G.EDITS)
    for edit, r in res.items():
        assert 0 <= r["analogy_accuracy"] <= 1 and -1 <= r["directional_consistency"] <= 1
        if edit != "all":  # the reported value is the mean of its per-pair items, so it lies inside their interval
            items = r["outcomes"]["directional_consistency"]
            assert r["directional_consistency"] == pytest.approx(items.value.mean(), abs=1e-6), edit
    assert len(G.edit_statements(cp)) == len(cp.pairs)


# --- the runners, end to end on stand-in models ---------------------------------------------------------------------
def test_runners_end_to_end_on_stand_in_models(runs_dir, capsys):
    from pc_clip.models.clip import create_clip, model_dir, save_checkpoint
    cfg = get_config("tiny", world_n_train=200, world_n_val=80, world_n_test=120)
    a, _, _ = create_clip("pc-clip-tiny", seed=0)
    b, _, _ = create_clip("pc-clip-tiny", seed=1)
    save_checkpoint(a, model_dir(cfg, "clip"), "pc-clip-tiny")
    save_checkpoint(a, model_dir(cfg, "pc-clip"), "pc-clip-tiny")
    with torch.no_grad():  # a text-only change: image numbers must stay identical, text numbers must move
        a.transformer.resblocks[-1].mlp.c_proj.weight.add_(0.5 * torch.randn_like(a.transformer.resblocks[-1].mlp.c_proj.weight))
    save_checkpoint(a, model_dir(cfg, "pc-clip/mse"), "pc-clip-tiny")
    save_checkpoint(b, model_dir(cfg, "pc-clip/both-towers"), "pc-clip-tiny")
    names = ["clip", "pc-clip", "pc-clip/mse", "pc-clip/both-towers", "clip-ft-captions"]
    rr = pd.DataFrame(E.run_retrieval(cfg, names, n_images=60, n_captions=3, progress=False))
    gr = pd.DataFrame(E.run_geometry(cfg, names, n_per_edit=6, n_quads=30, progress=False))
    pr = pd.DataFrame(E.run_linear_probe(cfg, names, max_train=150, progress=False))
    assert "skipping model clip-ft-captions" in capsys.readouterr().out
    for df in (rr, gr, pr):
        assert set(df.model) == set(names[:4])
    val = lambda df, m, metric, ds="world": df[(df.model == m) & (df.metric == metric) & (df.dataset == ds)].value.item()
    assert (pr[pr.model == "pc-clip/mse"].value.to_numpy() == pr[pr.model == "clip"].value.to_numpy()).all()
    assert set(pr.condition) >= {"", "C=0.1;split=val", "C=1;split=val"}
    assert val(gr, "pc-clip/mse", "analogy_accuracy") == val(gr, "clip", "analogy_accuracy")
    assert val(gr, "pc-clip/mse", "text_direction_cosine") != val(gr, "clip", "text_direction_cosine")
    assert val(gr, "pc-clip", "text_direction_cosine") == val(gr, "clip", "text_direction_cosine")
    assert rr[rr.model == "clip"].n.max() == 180  # 60 images x 3 captions
    assert (rr[rr.model == "pc-clip"].value.to_numpy() == rr[rr.model == "clip"].value.to_numpy()).all()
    assert rr[["ci_low", "ci_high"]].notna().all().all() and (rr.ci_low <= rr.value).all() and (rr.value <= rr.ci_high).all()


def test_retrieval_runner_reads_coco_on_paper_style_configs(runs_dir, tmp_path, monkeypatch):
    "With corpus='coco' the runner reads COCO val from the data root (a fixture here) with its own captions."
    from pc_clip.data.datasets import load_coco
    from pc_clip.models.clip import create_clip, model_dir, save_checkpoint
    from pc_clip.smoke.fixtures import make_fixture
    make_fixture("coco", tmp_path / "data")
    monkeypatch.setenv("PC_CLIP_DATA", str(tmp_path / "data"))
    cfg = get_config("tiny", corpus="coco")
    model, _, _ = create_clip("pc-clip-tiny", seed=0)
    save_checkpoint(model, model_dir(cfg, "clip"), "pc-clip-tiny")
    rows = E.run_retrieval(cfg, ["clip"], progress=False)
    coco = load_coco(tmp_path / "data", "val")
    n_captions = sum(len(c) for c in coco.captions)
    assert {r["dataset"] for r in rows} == {"coco"} and len(rows) == 6
    assert {r["n"] for r in rows} == {len(coco), n_captions}
    assert all(r["value"] == 1.0 for r in rows if r["metric"].startswith("recall@10"))  # fewer candidates than k


def test_an_unreadable_image_keeps_heldout_geometry_rows_aligned(tmp_path, monkeypatch):
    "One unreadable COCO image drops its own pairs; every other statement still meets its own pair's images."
    from pc_clip.evaluation import paper_geometry as P
    from pc_clip.data.datasets import load_coco
    from pc_clip.models.embed import embed_images
    from pc_clip.models.clip import create_clip, model_dir, save_checkpoint
    from pc_clip.smoke.fixtures import make_fixture
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PC_CLIP_DATA", str(tmp_path / "data"))
    make_fixture("coco", tmp_path / "data", n_images=8)
    cfg = get_config("tiny", corpus="coco", n_pairs=200, generator="tiny-chat")
    model, pre, tok = create_clip("pc-clip-tiny", seed=0)
    save_checkpoint(model, model_dir(cfg, "clip"), "pc-clip-tiny")

    class Writer:  # a stand-in generator: one statement per pair, naming the pair (so each text differs)
        name, batch_size, config = "tiny-chat", 16, {}
        def generate(self, items, task="differences"):
            return [{"raw": f"The first image is brighter than the second image number {it['i'] % 97}."} for it in items]

    recs = P.write_heldout_differences(cfg, Writer(), progress=False)
    intact = load_coco(tmp_path / "data", "val")
    emb_intact = embed_images(model, intact, cfg, preprocess=pre, cache=False, progress=False)
    ids = intact.image_info.image_id.tolist()
    broken = ids[1]  # the second image: before the fix, every later pair shifted by one row
    (tmp_path / "data" / "coco" / "val2017" / f"{broken:012d}.jpg").write_bytes(b"not a jpeg")
    rows = pd.DataFrame(P.run_paper_geometry(cfg, ["clip"], progress=False))
    cos = rows[(rows.metric == "text_direction_cosine") & (rows.condition == "pairs=heldout")]
    assert len(cos) == 1
    # the expected value, from the intact embeddings of the pairs without the broken image
    st = P.heldout_statements(recs, intact)
    keep = [r["item"]["i"] != broken and r["item"]["j"] != broken for r in recs for _ in r["statements"]]
    st = st[keep].reset_index(drop=True)
    assert 0 < len(st) < len(keep)
    from pc_clip.models.embed import embed_texts
    want = P.pair_alignment(emb_intact, st, embed_texts(model, tok, list(st.text), cfg))["text_direction_cosine"]
    assert cos.value.item() == pytest.approx(want, abs=1e-5)
    assert cos.n.item() == len(st)
