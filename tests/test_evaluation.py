"""Tests of `pc_clip.evaluation`: pure metrics, task builders, the runner, comparative prompting and
geometry."""
import itertools
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pc_clip.evaluation.comparative import (class_differences, comparative_class_embeddings,
    comparative_prompting, known_pairs, top_confused_pairs)
from pc_clip.core.config import embedding_options, get_config
from pc_clip.core.results import read_results
from pc_clip.evaluation.runner import (build_difference_tasks, evaluation_rows, read_items, write_evaluation,
    zero_shot_classifier)
from pc_clip.evaluation.metrics import (classification_metrics, difference_classification, difference_cosines,
    sample_eval_indices, zero_shot, geometry)
from pc_clip.models.clip import create_clip, encode_texts
from pc_clip.world.oracle import difference_direction, ATTRIBUTE_KINDS
from pc_clip.world.shapes import heldout_category_pairs, sample_attributes, build_world
from pc_clip.world.species import category_groups, typical_attrs
from pc_clip.evaluation.tasks import (DifferenceTask, cifar100_size_task, cub_comparative_task,
    world_difference_tasks)
from pc_clip.smoke.fixtures import accept_fixture_checksums, make_fixture
from pc_clip.evaluation import metrics as M, runner as E, geometry as G
from pc_clip.core.registry import model_dir, store_options
from pc_clip.core.run import results_path


# ---- Difference-based classification, zero-shot and comparative prompting: behaviour a user relies on.

D = 32


def attribute_world(n=400, seed=0):
    "Images whose embedding encodes a 3-level attribute along axis 0 (monotone after normalisation)."
    rng = np.random.default_rng(seed)
    level = rng.integers(0, 3, n)
    x = rng.normal(size=(n, D))
    x[:, 0] = 0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[:, 0] = level
    return F.normalize(torch.tensor(x, dtype=torch.float32), dim=-1), level


AXIS = torch.eye(D)[0]


def encoder(table):
    rng = torch.Generator().manual_seed(0)
    random = {}

    def encode(texts):
        out = []
        for t in texts:
            if t not in table and t not in random:
                random[t] = torch.randn(D, generator=rng)
            out.append(table.get(t, random.get(t)))
        return torch.stack(out)
    return encode


ENC = encoder({"more": AXIS, "less": -AXIS})


def accuracies(res):
    return [r["accuracy"] for r in res.values()]


def test_right_text_scores_one_reversed_zero():
    emb, level = attribute_world()
    right = difference_classification(emb, level, lambda a, b: "more" if a > b else "less", ENC,
                                      seeds=(0, 1, 2))
    wrong = difference_classification(emb, level, lambda a, b: "less" if a > b else "more", ENC,
                                      seeds=(0, 1, 2))
    assert accuracies(right) == [1.0, 1.0, 1.0]
    assert accuracies(wrong) == [0.0, 0.0, 0.0]


def test_unrelated_texts_sit_near_chance():
    emb, level = attribute_world(n=600)
    # a different random direction for every ordered class pair, many seeds
    rows = difference_classification(emb, level, lambda a, b: f"unrelated {a}-{b}", ENC, seeds=range(10))
    assert 0.35 < np.mean(accuracies(rows)) < 0.65


def test_shortcut_equals_the_literal_protocol():
    """Counting by sign of text·(g1 - g2) equals counting cos(text, normalise(g1 - g2)) > 0 over all
    cross-class pairs."""
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(120, D, generator=g), dim=-1)
    labels = np.random.default_rng(1).integers(0, 4, 120)
    texts = {(a, b): f"t{a}{b}" for a in range(4) for b in range(4) if a != b}
    enc = encoder({})
    res = difference_classification(emb, labels, lambda a, b: texts[(a, b)], enc, n_images=50, seeds=(7,))
    idx = sample_eval_indices(120, 50, 7)
    T = dict(zip(texts.values(), F.normalize(enc(list(texts.values())), dim=-1)))
    correct = total = 0
    for i, j in itertools.permutations(idx, 2):
        if labels[i] == labels[j]:
            continue
        cos = difference_cosines(emb[i][None], emb[j][None], T[texts[(labels[i], labels[j])]])
        correct += int(cos.item() > 0)
        total += 1
    assert res[7]["n"]["accuracy"] == total
    assert res[7]["accuracy"] == pytest.approx(correct / total)
    o = res[7]["outcomes"]["accuracy"]
    assert o["weight"].sum() == total and (o["value"] * o["weight"]).sum() == pytest.approx(correct)


def test_samples_are_seeded_and_rows_follow_the_contract():
    emb, level = attribute_world()
    fn = lambda a, b: "more" if a > b else None
    a = evaluation_rows(difference_classification(emb, level, fn, ENC, n_images=30, seeds=(0, 1)), "m",
                        "difference_classification", "d", {"wording": "train"})
    b = evaluation_rows(difference_classification(emb, level, fn, ENC, n_images=30, seeds=(0, 1)), "m",
                        "difference_classification", "d", {"wording": "train"})
    without_items = lambda rows: [{k: v for k, v in r.items() if k != "items"} for r in rows]
    assert without_items(a) == without_items(b)
    assert [r["seed"] for r in a] == [0, 1]
    assert {(r["model"], r["task"], r["dataset"], r["condition"], r["metric"]) for r in a} == {
        ("m", "difference_classification", "d", "wording=train", "accuracy")}
    assert a[0]["ci_low"] == a[1]["ci_low"] <= a[0]["ci_high"]  # one interval, seeds pooled


def test_each_distinct_text_is_encoded_once():
    emb, level = attribute_world()
    calls = []

    def enc(texts):
        calls.append(list(texts))
        return ENC(texts)
    difference_classification(emb, level, lambda a, b: ["more", "more"] if a > b else "less", enc,
                              seeds=(0, 1, 2))
    assert len(calls) == 1 and sorted(calls[0]) == ["less", "more"]


def test_task_on_a_subset_uses_its_indices():
    emb, level = attribute_world()
    keep = np.flatnonzero(level != 1)
    task = DifferenceTask("extremes", keep, level[keep], lambda a, b: "more" if a > b else "less")
    res = difference_classification(emb[torch.as_tensor(task.indices)], task.labels, task.text_fn, ENC, 50,
                                    (0,))
    assert res[0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="condition"):
        DifferenceTask("extremes@heldout", keep, level[keep], task.text_fn)


@pytest.fixture(scope="module")
def tiny():
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    return model, tok


def test_zero_shot_equals_an_independent_computation(tiny):
    model, tok = tiny
    classes = ["glorp", "vantile", "brombel", "zorn", "skiv"]
    W = zero_shot_classifier(model, tok, classes)
    plain = F.normalize(encode_texts(model, tok, [f"This is a photo of a {c}" for c in classes]), dim=-1)
    g = torch.Generator().manual_seed(0)
    # images near class prompts plus noise, so that accuracy is neither 0 nor 1
    labels = np.random.default_rng(0).integers(0, 5, 300)
    img = F.normalize(plain[labels] + 0.15 * torch.randn(300, plain.shape[1], generator=g), dim=-1)
    got = zero_shot(img, labels, W)
    conf = got["confusion"]
    pred = (img @ plain.T).argmax(-1).numpy()
    acc = float((pred == labels).mean())
    per_class = [float((pred[labels == k] == k).mean()) for k in range(5)]
    assert got["accuracy"] == pytest.approx(acc)
    assert got["worst_class_accuracy"] == pytest.approx(min(per_class))
    assert 0 < acc < 1
    np.testing.assert_array_equal(conf, pd.crosstab(labels, pred).reindex(index=range(5), columns=range(5),
                                                                          fill_value=0).to_numpy())


def test_worst_class_ignores_absent_classes():
    m = classification_metrics([0, 1, 1], [0, 1, 0], 3)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["worst_class_accuracy"] == 0.5


def test_comparative_update_formula_by_hand():
    f = F.normalize(torch.tensor([[1.0, 0, 0], [0.9, 0.436, 0], [0, 0, 1.0]]), dim=-1)
    d01 = F.normalize(torch.tensor([1.0, -1.0, 0]), dim=0)
    d21 = F.normalize(torch.tensor([0.0, -1.0, 1.0]), dim=0)
    new = comparative_class_embeddings(f, {(0, 1): d01, (2, 1): d21}, alpha=0.9)
    by_hand = 0.9 * f[1] + 0.1 * ((f[0] - d01) + (f[2] - d21)) / 2
    torch.testing.assert_close(new[1], by_hand / by_hand.norm())
    torch.testing.assert_close(new[[0, 2]], f[[0, 2]])
    assert float(new[1] @ f[0]) < float(f[1] @ f[0])  # B moved away from the class it was confused with


def test_alpha_one_equals_zero_shot():
    g = torch.Generator().manual_seed(0)
    class_emb = F.normalize(torch.randn(6, D, generator=g), dim=-1)
    labels = np.random.default_rng(0).integers(0, 6, 200)
    img = F.normalize(class_emb[labels] + 0.3 * torch.randn(200, D, generator=g), dim=-1)
    zs = zero_shot(img, labels, class_emb)
    diffs = {p: F.normalize(torch.randn(D, generator=g),
                            dim=0) for p in known_pairs(top_confused_pairs(zs["confusion"], 3))}
    assert diffs
    at_one = comparative_prompting(img, labels, class_emb, diffs, 1.0)
    assert at_one["accuracy"] == zs["accuracy"]
    assert at_one["worst_class_accuracy"] == zs["worst_class_accuracy"]
    moved = comparative_prompting(img, labels, class_emb, diffs, 0.5)
    assert len(moved["outcomes"]["confused_class_accuracy"]) == np.isin(labels, [b for _, b in diffs]).sum()


def test_top_confused_pairs_order():
    conf = np.diag([5, 5, 5, 5])
    conf[2, 3], conf[3, 2], conf[0, 1] = 4, 1, 2
    assert top_confused_pairs(conf, 10) == [(2, 3), (0, 1)]


def test_rows_fit_the_results_table_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    from pc_clip.report.claims import Claim, claim_verdicts
    from pc_clip.report.tables import direction_sentences
    cfg = get_config("tiny")
    emb, level = attribute_world()
    dc = lambda fn, model: evaluation_rows(difference_classification(emb, level, fn, ENC, seeds=(0, 1)),
                                           model, "difference_classification", "world/level",
                                           {"wording": "heldout"})
    rows = dc(lambda a, b: "more" if a > b else "less", "pc-clip") + dc(lambda a, b: f"x{a}{b}", "clip")
    class_emb = F.normalize(torch.randn(3, D), dim=-1)
    for alpha in (1.0, 0.9):
        rows += evaluation_rows({0: comparative_prompting(emb, level, class_emb, {(0, 1): AXIS}, alpha)},
                                "pc-clip", "comparative_prompting", "world", {"alpha": alpha, "split": "val"})
    write_evaluation(rows, cfg, "test")
    table, items = read_results(results_path(cfg)), read_items(cfg)
    assert len(table) == len(rows) and not table["dataset"].str.contains("[@=]").any()
    assert set(table.condition) == {"wording=heldout", "alpha=1;split=val", "alpha=0.9;split=val"}
    assert table[["ci_low", "ci_high"]].notna().all().all()
    sentence = direction_sentences(table, "difference_classification")[0]
    assert sentence.startswith("pc-clip vs clip on world/level [wording=heldout] (accuracy): 1.000 vs")
    assert sentence.endswith("(better)")
    claim = Claim("held", "held-out wordings", "difference_classification", "pc-clip", "clip",
                  conditions=(("wording", "heldout"),))
    v = claim_verdicts(table, items, [claim]).iloc[0]
    clip_items = items[(items.model == "clip") & (items.task == "difference_classification")]
    assert v.agrees == "yes" and v.ci_low > 0 and v.n_items == len(clip_items)


def test_world_tasks_report_heldout_wordings():
    attrs = sample_attributes(0, 0, 320)
    tasks = world_difference_tasks(attrs, heldout_category_pairs(0), n_texts=2)
    key = lambda t: (t.dataset, t.condition.get("pairs"))
    base = [t for t in tasks if t.condition["wording"] == "train"]
    held = {key(t): t for t in tasks if t.condition["wording"] == "heldout"}
    assert len(base) == 7 and set(held) == {key(t) for t in base}
    assert all("@" not in t.dataset and "=" not in t.dataset for t in tasks)
    for t in base:
        h = held[key(t)]
        labels = sorted(set(t.labels.tolist()))
        pairs = [(a, b) for a in labels for b in labels if a != b]
        as_list = lambda x: [x] if isinstance(x, str) else list(x or [])
        texts = lambda task: {s for p in pairs for s in as_list(task.text_fn(*p))}
        assert texts(t) and texts(h) and not texts(t) & texts(h), key(t)


def test_world_class_level_texts_are_true_of_the_images():
    """Size and brightness texts are class-level; they must hold for (almost) every image pair they are
    attached to."""
    attrs = sample_attributes(0, 0, 800)
    g = category_groups()
    for attr, col, hi, lo, min_rate in (("size", "radius", "large", "small", 0.97),
                                        ("brightness", "brightness", "bright", "dark", 1.0)):
        a = attrs.loc[attrs.category.isin(g[hi]), col].to_numpy()
        b = attrs.loc[attrs.category.isin(g[lo]), col].to_numpy()
        assert (a[:, None] > b[None, :]).mean() >= min_rate, attr
    task = {t.dataset: t for t in world_difference_tasks(attrs, [], wordings=("train",),
                                                         n_texts=3)}["world/size"]
    big, small = g["large"][0], g["small"][0]
    proto = lambda c: {**typical_attrs(c), "count": 1}
    assert difference_direction(proto(big), proto(small), "size")[0] == "larger"
    assert task.text_fn(big, small) and task.text_fn(big, small) != task.text_fn(small, big)
    assert task.text_fn(big, g["large"][1]) is None


def test_cifar100_size_on_the_fixture(tmp_path):
    from pc_clip.data.datasets import load_dataset
    with accept_fixture_checksums():
        ds = load_dataset("cifar100", make_fixture("cifar100", tmp_path, n_per_class=2), "test")
    task = cifar100_size_task(ds.classnames, ds.labels)
    kept = {ds.classnames[k] for k in task.labels}
    assert kept == {"camel", "hamster"}
    camel, hamster = ds.classnames.index("camel"), ds.classnames.index("hamster")
    assert "first image has the larger animal" in task.text_fn(camel, hamster)


class FakeBirdBackend:
    "A stand-in for the LLM backend: one comparative statement per class pair."
    name, config, batch_size = "fake-birds", {}, 8

    def generate(self, items, task):
        assert task == "category"
        return [{"raw": f"The {it['category_a']} has a longer bill than the {it['category_b']}.",
                 "prompt": None}
                for it in items]


def test_cub_comparatives_from_a_backend(tmp_path, monkeypatch):
    from pc_clip.data.datasets import load_dataset
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    with accept_fixture_checksums():
        ds = load_dataset("cub", make_fixture("cub", tmp_path / "data", n_per_class=2), "test")
    write = lambda pairs: class_differences(pairs, store_options(get_config("tiny")), FakeBirdBackend())
    task = cub_comparative_task(ds, ds.labels, write, seed=0, n_classes=2)
    assert len(set(task.labels.tolist())) == 2
    a, b = sorted(set(task.labels.tolist()))
    (text,) = task.text_fn(a, b)
    assert ds.classnames[a] in text and ds.classnames[b] in text and "longer bill" in text
    emb = F.normalize(torch.randn(len(ds), D), dim=-1)
    res = difference_classification(emb[torch.as_tensor(task.indices)], task.labels, task.text_fn, ENC,
                                    seeds=(0,))
    assert task.dataset == "cub/comparatives" and 0 <= res[0]["accuracy"] <= 1


def test_paper_task_builders_on_fixtures(tmp_path):
    from pc_clip.data.datasets import load_dataset
    cfg = get_config("paper")
    with accept_fixture_checksums():
        awa = load_dataset("awa2", make_fixture("awa2", tmp_path, n_per_class=2), "all")
    (task,) = build_difference_tasks(awa, awa.labels, cfg)
    n = len(awa.classnames)
    texts = [task.text_fn(a, b) for a in range(n) for b in range(n) if a != b]
    assert task.dataset == "awa2/attributes" and any(texts)
    assert all(t.startswith("The first image") for t in texts if t)
    with pytest.raises(ValueError, match="no difference task"):
        with accept_fixture_checksums():
            build_difference_tasks(load_dataset("eurosat", make_fixture("eurosat", tmp_path), "test"), [0],
                                   cfg)


def test_the_evaluated_models_come_from_the_registry_and_must_exist(runs_dir):
    """An evaluation never writes a table with the finetuned models silently missing: it names them and
    the fix."""
    from pc_clip.evaluation.runner import evaluated_models
    from pc_clip.models.clip import save_checkpoint
    from pc_clip.core.registry import model_names
    cfg = get_config("tiny", wavg_alpha=0.25)
    names = model_names(cfg)
    assert "pc-clip/wavg-0.25" in names and "pc-clip/wavg-0.5" not in names  # the name follows the setting
    # exists with a judge only
    assert "pc-clip/unfiltered" not in names and "pc-clip/unfiltered" in model_names()
    tiny = create_clip("pc-clip-tiny", seed=0)[0]
    for n in names[:-1]:
        save_checkpoint(tiny, model_dir(cfg, n), "pc-clip-tiny")
    with pytest.raises(FileNotFoundError, match=r"1 of the 10 models .* pc-clip/wavg-0\.25 .*--only 01,03"):
        evaluated_models(cfg)
    save_checkpoint(tiny, model_dir(cfg, names[-1]), "pc-clip-tiny")
    assert evaluated_models(cfg) == names


# ---- Pure metrics: bootstrap intervals, retrieval, geometry and probes on embeddings with known answers.

def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- intervals ----------------------------------------------------------------------------------------------
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


# --- retrieval ----------------------------------------------------------------------------------------------
def test_perfect_retrieval_with_several_captions_per_image():
    img = _unit(40, 32, 0)
    owner = np.repeat(np.arange(40), 5)  # five captions per image, as on COCO
    txt = F.normalize(img[owner] + 0.05 * _unit(200, 32, 1), dim=-1)
    rec = M.retrieval(img, txt, owner)
    recalls = {f"recall@{k}_{d}": 1.0 for k in (1, 5, 10) for d in ("i2t", "t2i")}
    assert {k: v for k, v in rec.items() if k != "outcomes"} == recalls


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
    chunked = M.retrieval(big_img, big_txt, big_owner, chunk=7)
    assert drop(chunked) == drop(M.retrieval(big_img, big_txt, big_owner))


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


# --- geometry -----------------------------------------------------------------------------------------------
def test_exact_offsets_solve_every_analogy_and_identical_directions_are_consistent():
    base = torch.randn(12, 24, generator=torch.Generator().manual_seed(0))
    offset = 2.0 * _unit(1, 24, 1)
    emb = torch.cat([base, base + offset])
    quads = M.analogy_quadruples(np.arange(12), np.arange(12) + 12)
    assert M.analogy_hits(emb, quads).mean() == 1.0
    assert M.directional_consistency(M.difference_vectors(emb, np.arange(12) + 12,
                                                          np.arange(12))) == pytest.approx(1.0, abs=1e-5)
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


# --- linear probes ------------------------------------------------------------------------------------------
def test_probe_chooses_C_on_validation_and_scores_test_once():
    rng = np.random.default_rng(0)
    y_tr, y_va, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    centres = 6 * rng.normal(size=(4, 16))
    feat = lambda y: centres[y] + rng.normal(size=(len(y), 16)) * 0.2
    r = M.linear_probe(feat(y_tr), y_tr, feat(y_va), y_va, feat(y_te), y_te, Cs=(1.0, 0.01))
    assert r["accuracy"] == 1.0 and set(r["validation"]) == {0.01, 1.0}
    assert r["C"] == M.best_on_validation(r["validation"])
    assert len(r["outcomes"]["accuracy"]) == 100
    # validation labels that are noise: the choice follows them, the test score does not see them
    noisy = M.linear_probe(feat(y_tr), y_tr, feat(y_va), rng.integers(0, 4, 100), feat(y_te), y_te,
                           Cs=(0.01, 1.0))
    assert noisy["validation"][0.01] < 0.6 and noisy["accuracy"] > 0.9


# ---- Retrieval, geometry and linear probes: known answers on synthetic embeddings and controlled world pairs



@pytest.fixture(scope="module")
def world():
    return build_world(0, 300, 300, n_val=50)


def test_controlled_pairs_differ_in_exactly_the_edited_attribute(world):
    cp = G.controlled_pairs(world, n_per_edit=10, seed=1)
    recs = cp.records()
    assert cp.pairs["edit"].value_counts().to_dict() == {e: 10 for e in G.EDITS}
    for p in cp.pairs.itertuples():
        changed = [k for k in ATTRIBUTE_KINDS
                   if difference_direction(recs[p.edited], recs[p.base], k) is not None]
        assert changed == [G.EDITS[p.edit].attribute], (p.edit, changed)
    # a background edit leaves the object's pixels alone: pixels that stay put are most of the image for
    # large objects
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
        # the reported value is the mean of its per-pair items, so it lies inside their interval
        if edit != "all":
            items = r["outcomes"]["directional_consistency"]
            assert r["directional_consistency"] == pytest.approx(items.value.mean(), abs=1e-6), edit
    assert len(G.edit_statements(cp)) == len(cp.pairs)


# --- the runners, end to end on stand-in models -------------------------------------------------------------
def test_runners_end_to_end_on_stand_in_models(runs_dir, capsys):
    from pc_clip.models.clip import create_clip, save_checkpoint
    cfg = get_config("tiny", world_n_train=200, world_n_val=80, world_n_test=120)
    a, _, _ = create_clip("pc-clip-tiny", seed=0)
    b, _, _ = create_clip("pc-clip-tiny", seed=1)
    save_checkpoint(a, model_dir(cfg, "clip"), "pc-clip-tiny")
    save_checkpoint(a, model_dir(cfg, "pc-clip"), "pc-clip-tiny")
    with torch.no_grad():  # a text-only change: image numbers must stay identical, text numbers must move
        weight = a.transformer.resblocks[-1].mlp.c_proj.weight
        weight.add_(0.5 * torch.randn_like(weight))
    save_checkpoint(a, model_dir(cfg, "pc-clip/mse"), "pc-clip-tiny")
    save_checkpoint(b, model_dir(cfg, "pc-clip/both-towers"), "pc-clip-tiny")
    names = ["clip", "pc-clip", "pc-clip/mse", "pc-clip/both-towers", "clip-ft-captions"]
    rr = pd.DataFrame(E.run_retrieval(cfg, names, n_images=60, n_captions=3, progress=False))
    gr = pd.DataFrame(E.run_geometry(cfg, names, n_per_edit=6, n_quads=30, progress=False))
    pr = pd.DataFrame(E.run_linear_probe(cfg, names, max_train=150, progress=False))
    assert "skipping model clip-ft-captions" in capsys.readouterr().out
    for df in (rr, gr, pr):
        assert set(df.model) == set(names[:4])
    val = lambda df, m, metric, ds="world": df[(df.model == m) & (df.metric == metric)
                                               & (df.dataset == ds)].value.item()
    assert (pr[pr.model == "pc-clip/mse"].value.to_numpy() == pr[pr.model == "clip"].value.to_numpy()).all()
    assert set(pr.condition) >= {"", "C=0.1;split=val", "C=1;split=val"}
    assert val(gr, "pc-clip/mse", "analogy_accuracy") == val(gr, "clip", "analogy_accuracy")
    assert val(gr, "pc-clip/mse", "text_direction_cosine") != val(gr, "clip", "text_direction_cosine")
    assert val(gr, "pc-clip", "text_direction_cosine") == val(gr, "clip", "text_direction_cosine")
    assert rr[rr.model == "clip"].n.max() == 180  # 60 images x 3 captions
    assert (rr[rr.model == "pc-clip"].value.to_numpy() == rr[rr.model == "clip"].value.to_numpy()).all()
    assert rr[["ci_low", "ci_high"]].notna().all().all()
    assert (rr.ci_low <= rr.value).all() and (rr.value <= rr.ci_high).all()


def test_retrieval_runner_reads_coco_on_paper_style_configs(runs_dir, tmp_path, monkeypatch):
    "With corpus='coco' the runner reads COCO val from the data root (a fixture here) with its own captions."
    from pc_clip.data.datasets import load_coco
    from pc_clip.models.clip import create_clip, save_checkpoint
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
    # fewer candidates than k
    assert all(r["value"] == 1.0 for r in rows if r["metric"].startswith("recall@10"))


def test_an_unreadable_image_keeps_heldout_geometry_rows_aligned(tmp_path, monkeypatch):
    "One unreadable COCO image drops its own pairs; every other statement still meets its own pair's images."
    from pc_clip.evaluation import paper_geometry as P
    from pc_clip.data.datasets import load_coco
    from pc_clip.models.embed import embed_images
    from pc_clip.models.clip import create_clip, save_checkpoint
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PC_CLIP_DATA", str(tmp_path / "data"))
    make_fixture("coco", tmp_path / "data", n_images=8)
    cfg = get_config("tiny", corpus="coco", n_pairs=200, generator="tiny-chat")
    model, pre, tok = create_clip("pc-clip-tiny", seed=0)
    save_checkpoint(model, model_dir(cfg, "clip"), "pc-clip-tiny")

    class Writer:  # a stand-in generator: one statement per pair, naming the pair (so each text differs)
        name, batch_size, config = "tiny-chat", 16, {}
        def generate(self, items, task="differences"):
            return [{"raw": f"The first image is brighter than the second image number {it['i'] % 97}."}
                    for it in items]

    recs = P.write_heldout_differences(store_options(cfg), Writer(), cfg.n_pairs, progress=False)
    intact = load_coco(tmp_path / "data", "val")
    emb_intact = embed_images(model, intact, None, **embedding_options(cfg), preprocess=pre, progress=False)
    ids = intact.image_info.image_id.tolist()
    broken = ids[1]  # the second image: before the fix, every later pair shifted by one row
    (tmp_path / "data" / "coco" / "val2017" / f"{broken:012d}.jpg").write_bytes(b"not a jpeg")
    rows = pd.DataFrame(E.run_paper_geometry(cfg, ["clip"], progress=False))
    cos = rows[(rows.metric == "text_direction_cosine") & (rows.condition == "pairs=heldout")]
    assert len(cos) == 1
    # the expected value, from the intact embeddings of the pairs without the broken image
    st = P.heldout_statements(recs, intact)
    keep = [r["item"]["i"] != broken and r["item"]["j"] != broken for r in recs for _ in r["statements"]]
    st = st[keep].reset_index(drop=True)
    assert 0 < len(st) < len(keep)
    from pc_clip.models.embed import embed_texts
    text_emb = embed_texts(model, tok, list(st.text), **embedding_options(cfg))
    want = P.pair_alignment(emb_intact, st, text_emb)["text_direction_cosine"]
    assert cos.value.item() == pytest.approx(want, abs=1e-5)
    assert cos.n.item() == len(st)


def test_write_evaluation_writes_items_before_rows(tmp_path, monkeypatch):
    "Issue 30: the rows commit an experiment; when they are written, its items are already the new ones."
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    from pc_clip.core.results import result_row
    cfg = get_config("tiny")
    row = lambda v: dict(result_row("clip", "zero_shot", "world", "accuracy", v, 0, 2),
                         items=pd.DataFrame({"item": ["a", "b"], "value": [v * 2, 0.0], "weight": 1.0,
                                             "group": "x"}))
    write_evaluation([row(0.5)], cfg, "toy")
    seen = {}

    def rows_after_items(rows, experiment, **results):
        seen["items"] = read_items(cfg, [experiment])["value"].tolist()  # what a kill here would leave
        raise KeyboardInterrupt  # stopped between the two writes

    monkeypatch.setattr(E, "write_results", rows_after_items)
    with pytest.raises(KeyboardInterrupt):
        write_evaluation([row(0.25)], cfg, "toy")
    assert seen["items"] == [0.5, 0.0]  # the new items were on disk before the rows were written
    # an interrupted write puts the old items back
    assert read_items(cfg, ["toy"])["value"].tolist() == [1.0, 0.0]
    assert read_results(results_path(cfg))["value"].tolist() == [0.5]
