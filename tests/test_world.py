"""The Shapes world: determinism, pixels that agree with attributes, faithful captions, a truthful oracle."""
import numpy as np
import pandas as pd
import pytest

from pc_clip.core.config import get_config
from pc_clip.world.oracle import (ATTRIBUTE_KINDS, category_differences, oracle_differences,
    statement_is_true, wording_templates)
from pc_clip.world.render import measured_object_stats, nearest_colour, render_images
from pc_clip.world.species import (CATEGORIES, NON_VISUAL, attribute_info, category_groups,
    class_attribute_table)
from pc_clip.world.shapes import (build_world, caption_contradictions, heldout_category_pairs,
    heldout_combinations, make_caption, make_world, oracle_rewrite_caption, sample_attributes)
from pc_clip.core.registry import world_options


@pytest.fixture(scope="module")
def attrs():
    return sample_attributes(seed=4, n_train=1500, n_test=500, n_val=300)


@pytest.fixture(scope="module")
def pairs(attrs):
    recs = attrs.to_dict("records")
    rng = np.random.default_rng(1)
    return [(recs[i], recs[j]) for i, j in rng.integers(0, len(recs), (2000, 2)) if i != j]


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = build_world(3, 200, 50), build_world(3, 200, 50), build_world(4, 200, 50)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    pd.testing.assert_frame_equal(a.attrs, b.attrs)
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions
    assert a.images.dtype == np.uint8 and a.images.shape == (250, 32, 32, 3)
    assert list(a.attrs["split"]).count("test") == 50


def test_val_split_is_disjoint_and_leaves_train_and_test_unchanged():
    plain, with_val = build_world(3, 200, 50), build_world(3, 200, 50, n_val=40)
    assert [len(with_val.indices(s)) for s in ("train", "val", "test")] == [200, 40, 50]
    ids = {s: set(with_val.attrs["image_id"].iloc[with_val.indices(s)]) for s in ("train", "val", "test")}
    assert not ids["val"] & ids["train"] and not ids["val"] & ids["test"]
    assert np.array_equal(with_val.images[:250], plain.images) and with_val.captions[:250] == plain.captions
    pd.testing.assert_frame_equal(with_val.attrs.iloc[:250], plain.attrs)
    val = with_val.images[with_val.indices("val")]  # new images, not copies of train or test ones
    assert not any(np.array_equal(v, x) for v in val[:10] for x in plain.images)
    with pytest.raises(ValueError, match="split must be one of"):
        with_val.indices("validation")


def test_pixels_agree_with_attributes(attrs):
    images, coverage = render_images(attrs, return_coverage=True)
    m = measured_object_stats(images, coverage)
    assert [nearest_colour(h) for h in m["hue"]] == list(attrs["colour"])  # the named hue is what was drawn
    # brighter attribute, brighter pixels
    assert np.corrcoef(m["value"], attrs["brightness"])[0, 1] > 0.99
    single = attrs[attrs["count"] == 1]
    for shape, grp in single.groupby("shape"):                              # larger radius, larger area
        area = pd.Series(m["area"][grp.index].to_numpy())
        rho = area.corr(grp["radius"].reset_index(drop=True), method="spearman")
        assert rho > 0.97, (shape, rho)
    # objects sit where the attributes say: the covered mass is left of centre for 'left' images
    cx = (coverage * np.arange(32)[None, None, :]).sum((1, 2)) / coverage.sum((1, 2)) / 32
    assert np.all(cx[attrs["position"] == "left"] < 0.5) and np.all(cx[attrs["position"] == "right"] > 0.5)


def test_captions_never_contradict_attributes(attrs):
    rng = np.random.default_rng(0)
    for r in attrs.to_dict("records"):
        for text in (make_caption(r, rng), make_caption(r, rng, "plain"), oracle_rewrite_caption(r, rng)):
            assert caption_contradictions(text, r) == [], (text, r)
            assert r["category"] in text
    # and the checker does catch a contradiction
    r = attrs.iloc[0].to_dict()
    other = next(c for c in CATEGORIES.index if c != r["category"])
    assert caption_contradictions(f"A photo of a {other}.", r)


def test_oracle_is_true_at_zero_noise(pairs):
    rng = np.random.default_rng(0)
    stmts = [(s, a, b) for a, b in pairs for s in oracle_differences(a, b, rng)]
    assert len(stmts) > 2000
    assert all(s["true"] and statement_is_true(s, a, b) for s, a, b in stmts)
    assert {s["attribute"] for s, _, _ in stmts} == set(ATTRIBUTE_KINDS)
    for s, a, b in stmts:  # the text names what it claims
        if s["attribute"] in ("colour", "category", "background"):
            assert s["first"] in s["text"], s
        if s["attribute"] == "size":
            assert any(w in s["text"] for w in ("larger", "bigger", "smaller")), s


def test_oracle_noise_rate_and_falsity(pairs):
    rng = np.random.default_rng(0)
    stmts = [(s, a, b) for a, b in pairs for s in oracle_differences(a, b, rng, noise=0.3)]
    rate = np.mean([not s["true"] for s, _, _ in stmts])
    assert abs(rate - 0.3) < 0.04, rate
    assert all(s["true"] == statement_is_true(s, a, b) for s, a, b in stmts)
    for s, a, b in stmts:  # a reversed statement's text says the reversed thing
        if s["attribute"] in ("colour", "category", "background"):
            assert s["first"] in s["text"], s
    kinds = {s["attribute"] == "hallucination" for s, _, _ in stmts if not s["true"]}
    assert kinds == {True, False}  # both reversed and hallucinated statements occur


def test_wordings_vary_and_heldout_is_disjoint(pairs):
    train, held = wording_templates("train"), wording_templates("heldout")
    for kind in train:
        assert not set(train[kind]) & set(held[kind]) and len(held[kind]) >= 1
    rng = np.random.default_rng(0)
    texts = [s for a, b in pairs[:500] for s in oracle_differences(a, b, rng)]
    # every train wording is used
    assert len({s["wording"] for s in texts}) == sum(len(v) for v in train.values())
    heldout_ids = {f"{k}:{len(train[k]) + i}" for k in held for i in range(len(held[k]))}
    assert not heldout_ids & {s["wording"] for s in texts}                             # held-out ones never
    ho = [s for a, b in pairs[:300] for s in oracle_differences(a, b, rng, wordings="heldout")]
    assert {s["wording"] for s in ho} <= heldout_ids
    # two-clause and short forms both occur, in both clause orders
    assert any(" while " in s["text"] for s in texts)
    assert any(s["text"].startswith("The second one") for s in texts)


def test_class_table_orderings_and_pairs():
    t = class_attribute_table()
    assert t.shape[0] >= 12 and t.shape[1] >= 20 and set(np.unique(t.to_numpy())) == {0, 1}
    info = attribute_info()
    assert set(info.index[~info["visual"]]) == set(NON_VISUAL) and len(NON_VISUAL) >= 3
    g = category_groups()
    assert CATEGORIES.loc[g["large"], "radius"].min() > CATEGORIES.loc[g["small"], "radius"].max()
    rng = np.random.default_rng(0)
    big, small = g["large"][0], g["small"][0]
    assert any("larger" in s for s in category_differences(big, small, rng, n=10))
    h = heldout_category_pairs(0)
    assert h == heldout_category_pairs(0) and len(h) >= 10 and all(a < b for a, b in h)


def test_make_world_caches(runs_dir):
    cfg = get_config("tiny", world_n_train=300, world_n_test=100, world_n_val=60)
    w = make_world(**world_options(cfg))
    files = list((runs_dir / "cache" / "tiny" / "world").iterdir())
    assert len(files) == 2
    w2 = make_world(**world_options(cfg))
    assert np.array_equal(w.images, w2.images) and w.captions == w2.captions and w2.key == w.key
    assert make_world(**world_options(cfg.replace(world_n_test=101))).key != w.key
    assert make_world(**world_options(cfg.replace(world_n_val=61))).key != w.key
    assert len(w.indices("val")) == 60


def test_heldout_combinations_only_outside_train(attrs):
    combo = pd.MultiIndex.from_frame(attrs[["category", "colour"]]).isin(heldout_combinations(4))
    assert not combo[attrs["split"] == "train"].any() and combo[attrs["split"] == "test"].sum() >= 5
    assert combo[attrs["split"] == "val"].sum() >= 3
    assert (combo == attrs["novel_combination"].to_numpy()).all()


def test_comparative_captions_teach_the_words_of_differences():
    """Pretraining captions of the default style cover every word of the training wordings; the plain
    ablation's do not."""
    from pc_clip.world.oracle import vocabulary_coverage
    from pc_clip.world.shapes import species_norm_departures
    from pc_clip.world.species import typical_attrs
    world = build_world(0, 1500, 10)
    comp = vocabulary_coverage(world, epochs=3, seed=0, n_pairs=800).set_index("wording")
    world.caption_style = "plain"
    plain = vocabulary_coverage(world, epochs=3, seed=0, n_pairs=800).set_index("wording")
    assert comp.loc["train", "coverage"] == 1.0 and comp.loc["train", "unseen"] == ""
    assert comp.loc["heldout", "coverage"] > 0.97  # the held-out wordings' own words: rare but present
    assert plain.loc["train", "coverage"] < 0.7 and {"larger", "than", "first",
                                                     "whereas"} <= set(plain.loc["train", "unseen"].split())
    # a comparison in a caption is true of that image against its species' norm
    rng = np.random.default_rng(3)
    for r in world.records()[:1500]:
        text = make_caption(r, rng)
        norms = species_norm_departures(r)
        for word, kind, value in (("larger than", "size", "larger"), ("smaller than", "size", "smaller"),
                                  ("darker than", "brightness", "darker"),
                                  ("brighter than", "brightness", "brighter"),
                                  ("more numerous", "count", "more"), ("fewer in number", "count", "fewer")):
            if word in text:
                assert norms.get(kind) == value, (text, norms)
    big = dict(typical_attrs("mib"), radius=typical_attrs("mib")["radius"] * 0.8, position="center")
    assert species_norm_departures(big) == {"size": "smaller"}
