"Difference-based classification, zero-shot and comparative prompting: behaviour a user relies on."
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pc_clip.evaluation.comparative import (class_differences, comparative_class_embeddings, comparative_prompting,
    known_pairs, top_confused_pairs)
from pc_clip.core.config import get_config
from pc_clip.core.runtime import read_results
from pc_clip.evaluation.runner import (build_difference_tasks, evaluation_rows, read_items, write_evaluation,
    zero_shot_classifier)
from pc_clip.evaluation.metrics import (classification_metrics, difference_classification, difference_cosines,
    sample_eval_indices, zero_shot)
from pc_clip.models.clip import create_clip, encode_texts
from pc_clip.world.oracle import difference_direction
from pc_clip.world.shapes import heldout_category_pairs, sample_attributes
from pc_clip.world.species import category_groups, typical_attrs
from pc_clip.evaluation.tasks import DifferenceTask, cifar100_size_task, cub_comparative_task, world_difference_tasks
from pc_clip.smoke.fixtures import accept_fixture_checksums, make_fixture

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
    right = difference_classification(emb, level, lambda a, b: "more" if a > b else "less", ENC, seeds=(0, 1, 2))
    wrong = difference_classification(emb, level, lambda a, b: "less" if a > b else "more", ENC, seeds=(0, 1, 2))
    assert accuracies(right) == [1.0, 1.0, 1.0]
    assert accuracies(wrong) == [0.0, 0.0, 0.0]


def test_unrelated_texts_sit_near_chance():
    emb, level = attribute_world(n=600)
    # a different random direction for every ordered class pair, many seeds
    rows = difference_classification(emb, level, lambda a, b: f"unrelated {a}-{b}", ENC, seeds=range(10))
    assert 0.35 < np.mean(accuracies(rows)) < 0.65


def test_shortcut_equals_the_literal_protocol():
    "Counting by sign of text·(g1 - g2) equals counting cos(text, normalise(g1 - g2)) > 0 over all cross-class pairs."
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
    assert [{k: v for k, v in r.items() if k != "items"} for r in a] == [{k: v for k, v in r.items() if k != "items"} for r in b]
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
    difference_classification(emb, level, lambda a, b: ["more", "more"] if a > b else "less", enc, seeds=(0, 1, 2))
    assert len(calls) == 1 and sorted(calls[0]) == ["less", "more"]


def test_task_on_a_subset_uses_its_indices():
    emb, level = attribute_world()
    keep = np.flatnonzero(level != 1)
    task = DifferenceTask("extremes", keep, level[keep], lambda a, b: "more" if a > b else "less")
    res = difference_classification(emb[torch.as_tensor(task.indices)], task.labels, task.text_fn, ENC, 50, (0,))
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
    np.testing.assert_array_equal(conf, pd.crosstab(labels, pred).reindex(index=range(5), columns=range(5), fill_value=0).to_numpy())


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
    diffs = {p: F.normalize(torch.randn(D, generator=g), dim=0) for p in known_pairs(top_confused_pairs(zs["confusion"], 3))}
    assert diffs
    at_one = comparative_prompting(img, labels, class_emb, diffs, 1.0)
    assert at_one["accuracy"] == zs["accuracy"] and at_one["worst_class_accuracy"] == zs["worst_class_accuracy"]
    moved = comparative_prompting(img, labels, class_emb, diffs, 0.5)
    assert len(moved["outcomes"]["confused_class_accuracy"]) == np.isin(labels, [b for _, b in diffs]).sum()


def test_top_confused_pairs_order():
    conf = np.diag([5, 5, 5, 5])
    conf[2, 3], conf[3, 2], conf[0, 1] = 4, 1, 2
    assert top_confused_pairs(conf, 10) == [(2, 3), (0, 1)]


def test_rows_fit_the_results_table_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    from pc_clip.report.summary import Claim, claim_verdicts, direction_sentences
    cfg = get_config("tiny")
    emb, level = attribute_world()
    dc = lambda fn, model: evaluation_rows(difference_classification(emb, level, fn, ENC, seeds=(0, 1)), model,
                                           "difference_classification", "world/level", {"wording": "heldout"})
    rows = dc(lambda a, b: "more" if a > b else "less", "pc-clip") + dc(lambda a, b: f"x{a}{b}", "clip")
    class_emb = F.normalize(torch.randn(3, D), dim=-1)
    for alpha in (1.0, 0.9):
        rows += evaluation_rows({0: comparative_prompting(emb, level, class_emb, {(0, 1): AXIS}, alpha)}, "pc-clip",
                                "comparative_prompting", "world", {"alpha": alpha, "split": "val"})
    write_evaluation(rows, cfg, "test")
    table, items = read_results(cfg), read_items(cfg)
    assert len(table) == len(rows) and not table["dataset"].str.contains("[@=]").any()
    assert set(table.condition) == {"wording=heldout", "alpha=1;split=val", "alpha=0.9;split=val"}
    assert table[["ci_low", "ci_high"]].notna().all().all()
    sentence = direction_sentences(table, "difference_classification")[0]
    assert sentence.startswith("pc-clip vs clip on world/level [wording=heldout] (accuracy): 1.000 vs") and sentence.endswith("(better)")
    claim = Claim("held", "held-out wordings", "difference_classification", "pc-clip", "clip", conditions=(("wording", "heldout"),))
    v = claim_verdicts(table, items, [claim]).iloc[0]
    assert v.agrees == "yes" and v.ci_low > 0 and v.n_items == len(items[(items.model == "clip") & (items.task == "difference_classification")])


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
        pairs = [(a, b) for a in sorted(set(t.labels.tolist())) for b in sorted(set(t.labels.tolist())) if a != b]
        as_list = lambda x: [x] if isinstance(x, str) else list(x or [])
        texts = lambda task: {s for p in pairs for s in as_list(task.text_fn(*p))}
        assert texts(t) and texts(h) and not texts(t) & texts(h), key(t)


def test_world_class_level_texts_are_true_of_the_images():
    "Size and brightness texts are class-level; they must hold for (almost) every image pair they are attached to."
    attrs = sample_attributes(0, 0, 800)
    g = category_groups()
    for attr, col, hi, lo, min_rate in (("size", "radius", "large", "small", 0.97), ("brightness", "brightness", "bright", "dark", 1.0)):
        a = attrs.loc[attrs.category.isin(g[hi]), col].to_numpy()
        b = attrs.loc[attrs.category.isin(g[lo]), col].to_numpy()
        assert (a[:, None] > b[None, :]).mean() >= min_rate, attr
    task = {t.dataset: t for t in world_difference_tasks(attrs, [], wordings=("train",), n_texts=3)}["world/size"]
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
        return [{"raw": f"The {it['category_a']} has a longer bill than the {it['category_b']}.", "prompt": None}
                for it in items]


def test_cub_comparatives_from_a_backend(tmp_path, monkeypatch):
    from pc_clip.data.datasets import load_dataset
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    with accept_fixture_checksums():
        ds = load_dataset("cub", make_fixture("cub", tmp_path / "data", n_per_class=2), "test")
    write = lambda pairs: class_differences(pairs, get_config("tiny"), backend=FakeBirdBackend())
    task = cub_comparative_task(ds, ds.labels, write, seed=0, n_classes=2)
    assert len(set(task.labels.tolist())) == 2
    a, b = sorted(set(task.labels.tolist()))
    (text,) = task.text_fn(a, b)
    assert ds.classnames[a] in text and ds.classnames[b] in text and "longer bill" in text
    emb = F.normalize(torch.randn(len(ds), D), dim=-1)
    res = difference_classification(emb[torch.as_tensor(task.indices)], task.labels, task.text_fn, ENC, seeds=(0,))
    assert task.dataset == "cub/comparatives" and 0 <= res[0]["accuracy"] <= 1


def test_paper_task_builders_on_fixtures(tmp_path):
    from pc_clip.data.datasets import load_dataset
    cfg = get_config("paper")
    with accept_fixture_checksums():
        awa = load_dataset("awa2", make_fixture("awa2", tmp_path, n_per_class=2), "all")
    (task,) = build_difference_tasks(awa, awa.labels, cfg)
    texts = [task.text_fn(a, b) for a in range(len(awa.classnames)) for b in range(len(awa.classnames)) if a != b]
    assert task.dataset == "awa2/attributes" and any(texts)
    assert all(t.startswith("The first image") for t in texts if t)
    with pytest.raises(ValueError, match="no difference task"):
        with accept_fixture_checksums():
            build_difference_tasks(load_dataset("eurosat", make_fixture("eurosat", tmp_path), "test"), [0], cfg)


def test_the_evaluated_models_come_from_the_registry_and_must_exist(runs_dir):
    "An evaluation never writes a table with the finetuned models silently missing: it names them and the fix."
    from pc_clip.evaluation.runner import MODELS, evaluated_models
    from pc_clip.models.clip import model_dir, save_checkpoint
    from pc_clip.core.registry import model_names
    cfg = get_config("tiny", wavg_alpha=0.25)
    names = model_names(cfg)
    assert "pc-clip/wavg-0.25" in names and "pc-clip/wavg-0.5" not in names  # the name follows the setting
    assert "pc-clip/unfiltered" not in names and "pc-clip/unfiltered" in MODELS  # exists with a judge only
    tiny = create_clip("pc-clip-tiny", seed=0)[0]
    for n in names[:-1]:
        save_checkpoint(tiny, model_dir(cfg, n), "pc-clip-tiny")
    with pytest.raises(FileNotFoundError, match=r"1 of the 8 models .* pc-clip/wavg-0\.25 .*--only 01,03"):
        evaluated_models(cfg)
    save_checkpoint(tiny, model_dir(cfg, names[-1]), "pc-clip-tiny")
    assert evaluated_models(cfg) == names
