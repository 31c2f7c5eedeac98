"""Tests of `pc_clip.report`: every result figure is drawn from the results table, intervals included."""
import io
import numpy as np
import pandas as pd
import pytest

from pc_clip.core.results import condition_string
from pc_clip.core.registry import model_names
from pc_clip.report.claims import RECALLS
from pc_clip.report.figures import bar_figure

MODELS = model_names()  # every evaluated registry entry


# ---- Every figure of a result is drawn from a results table and shows the 95 % interval of its rows: each
# figure the

RNG = np.random.default_rng(0)


def _rows(task, cells, metrics, models=MODELS, seeds=(0,)):
    rows = []
    for (dataset, condition) in cells:
        for metric in metrics:
            for k, model in enumerate(models):
                for seed in seeds:
                    v = float(np.clip(0.4 + 0.03 * k + RNG.normal(0, 0.01), 0, 1))
                    rows.append(dict(experiment="x", profile="tiny", model=model, task=task, dataset=dataset,
                                     condition=condition, metric=metric, value=v, ci_low=v - 0.05,
                                     ci_high=v + 0.04, seed=seed, n=100))
    return rows


# the calls of experiments 04, 05, 06, 07, 08, 09 and 11, on a table shaped like theirs
FIGURES = {
    "difference_classification": (dict(chance=0.5), [(f"world/{a}", f"wording={w}") for a in ("size", "count")
                                                      for w in ("train", "heldout")], ["accuracy"]),
    "zero_shot": (dict(metric="worst_class_accuracy"), [("world", ""), ("cifar100", "")],
                  ["accuracy", "worst_class_accuracy"]),
    "comparative_prompting": (dict(metric="accuracy"), [("world", "alpha=1"), ("world", "alpha=0.85")],
                              ["accuracy"]),
    "retrieval": (dict(metric=list(RECALLS), x="metric"), [("world", "")], list(RECALLS)),
    "geometry": (dict(metric=["accuracy", "directional_consistency"], x="metric", dataset="world"),
                 [("world", "")], ["accuracy", "directional_consistency"]),
    "linear_probe": (dict(metric="accuracy"), [("world", "C=1")], ["accuracy"]),
    "t2i_arithmetic": (dict(metric=["success_rate", "species_accuracy"], x="metric", dataset="world",
                            chance={"success_rate": 0.2}), [("world", "")],
                            ["success_rate", "species_accuracy"]),
}


def _png(fn, *args, **kw) -> bytes:
    buf = io.BytesIO()
    fig = fn(*args, **kw)
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.mark.parametrize("task", list(FIGURES))
def test_bar_figures_draw_the_tables_intervals(task, tmp_path):
    kw, cells, metrics = FIGURES[task]
    table = pd.DataFrame(_rows(task, cells, metrics, seeds=(0, 1)))
    wider = table.assign(ci_low=table["value"] - 0.15)
    a = _png(bar_figure, table, task, models=list(MODELS), title=f"{task} " * 8, **kw)
    b = _png(bar_figure, wider, task, models=list(MODELS), title=f"{task} " * 8, **kw)
    c = _png(bar_figure, table, task, models=list(MODELS), title=f"{task} " * 8, **kw)
    assert a == c, "the same table must give the same figure"
    assert a != b, f"{task}: the figure does not change with ci_low: intervals not drawn"
    none = _png(bar_figure, table.assign(ci_low=np.nan, ci_high=np.nan), task, models=list(MODELS), **kw)
    assert none != a  # without intervals there are no interval lines (and the caption says so)


def test_figure_functions_leave_the_backend_and_pyplot_alone():
    """A figure function returns a Figure: it switches no backend and leaves no open pyplot figure to show
    twice."""
    import matplotlib
    import matplotlib.pyplot as plt
    backend = matplotlib.get_backend()
    kw, cells, metrics = FIGURES["retrieval"]
    fig = bar_figure(pd.DataFrame(_rows("retrieval", cells, metrics)), "retrieval", **kw)
    assert fig is not None and plt.get_fignums() == [] and matplotlib.get_backend() == backend


def test_caption_and_axes():
    """Geometry's accuracy and cosines get an axis each, named for a reader; the caption names the interval's
    source."""
    kw, cells, metrics = FIGURES["geometry"]
    fig = bar_figure(pd.DataFrame(_rows("geometry", cells, metrics)), "geometry", models=list(MODELS), **kw)
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in panels] == ["accuracy", "directional consistency (mean cosine)"]
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "95 % interval" in texts and "ci_low" in texts and "results.csv" in texts
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert not any("_" in t for t in labels), labels  # reader-facing names, never a column name


def test_beyond_figures_draw_intervals():
    from pc_clip.studies.noise_curve import CURVE_TASK, plot_noise_curve
    from pc_clip.studies.pretrain_difference import STUDY_TASK, plot_pretrain_study
    rows = []
    for noise in (0.0, 0.3):
        for filt in ("judge-0", "none"):
            for metric in ("difference_gain_vs_clip", "zero_shot_change_vs_clip"):
                rows.append(dict(model="pc-clip", task=CURVE_TASK, dataset="world", metric=metric,
                                 value=0.1 - noise / 10,
                                 ci_low=0.05 - noise / 10, ci_high=0.15 - noise / 10, seed=0, n=100,
                                 condition=condition_string(noise=noise, filter=filt)))
    curve = pd.DataFrame(rows)
    assert "95 % interval" in " ".join(t.get_text() for t in plot_noise_curve(curve).texts)
    assert _png(plot_noise_curve, curve) != _png(plot_noise_curve, curve.assign(ci_low=curve["ci_low"] - 0.1))
    rows = []
    for metric in ("difference_accuracy", "zero_shot_accuracy", "retrieval_recall@5_i2t"):
        for w in (0.0, 0.5):
            rows.append(dict(model="joint", task=STUDY_TASK, dataset="world", metric=metric,
                             value=0.5 + w / 10, ci_low=0.45, ci_high=0.6, seed=0, n=100,
                             condition=condition_string(arm="joint", w=w)))
        rows.append(dict(model="ptf", task=STUDY_TASK, dataset="world", metric=metric, value=0.52,
                         ci_low=0.47, ci_high=0.57, seed=0, n=100,
                         condition=condition_string(arm="pretrain-then-finetune", w=0.0)))
    study = pd.DataFrame(rows)
    assert "95 % interval" in " ".join(t.get_text() for t in plot_pretrain_study(study).texts)
    assert _png(plot_pretrain_study, study) != _png(plot_pretrain_study,
                                                    study.assign(ci_high=study["ci_high"] + 0.1))


# ---- The targets on test are decided as the claims are, and the REPORT counts every measured claim.

def _cell_items(model, task, dataset, condition, metric, values, seed=0, groups=None, statistic="mean"):
    n = len(values)
    return pd.DataFrame(dict(experiment="x", profile="tiny", model=model, task=task, dataset=dataset,
                             condition=condition, metric=metric, seed=seed, item=np.arange(n).astype(str),
                             value=np.asarray(values, float),
                             weight=1.0, group=np.zeros(n, int).astype(str) if groups is None else groups,
                             statistic=statistic))


def _random_items(rng, models=("clip", "pc-clip"), n=300):
    """Per-item outcomes of every task a target reads: several cells, two seeds, worst-class groups, six
    recalls."""
    parts = []
    for k, m in enumerate(models):
        for seed in (0, 1):
            for ds in ("world/size", "world/count"):
                for w in ("train", "heldout"):
                    parts.append(_cell_items(m, "difference_classification", ds, f"wording={w}", "accuracy",
                                             rng.random(n) < 0.5 + 0.1 * k, seed))
        hits = rng.random(n) < 0.7 - 0.01 * k
        parts += [_cell_items(m, "zero_shot", "world", "", "accuracy", hits),
                  _cell_items(m, "zero_shot", "world", "", "worst_class_accuracy", hits,
                              groups=(np.arange(n) % 5).astype(str), statistic="worst_group")]
        parts += [_cell_items(m, "retrieval", "world", "", r,
                              rng.random(n) < 0.4 - 0.02 * k) for r in RECALLS]
    return pd.concat(parts, ignore_index=True)


def test_targets_use_the_claims_interval_and_rule():
    from pc_clip.report.claims import PAPER_CLAIMS, claim_verdicts
    from pc_clip.training.selection import target_check
    items = _random_items(np.random.default_rng(3))
    results = pd.DataFrame(columns=["model", "task", "dataset", "condition", "metric", "value", "seed"])
    t = target_check(results, items=items).set_index("target")
    v = claim_verdicts(results, items, PAPER_CLAIMS).set_index("claim")
    pairs = {"difference classification, training wordings": "difference_classification",
             "difference classification, held-out wordings": "difference_heldout_wording",
             "zero-shot accuracy": "zero_shot", "worst-class zero-shot accuracy": "zero_shot_worst_class",
             "mean retrieval recall": "retrieval"}
    # the same items, the same function, the same interval, to the last bit
    for target, claim in pairs.items():
        assert t.loc[target, "items"] == v.loc[claim, "n_items"] > 0, target
        assert t.loc[target, "cells"] == v.loc[claim, "cells"], target
        for a, b in (("change", "delta"), ("ci_low", "ci_low"), ("ci_high", "ci_high"),
                     ("pc-clip", "value_a"), ("clip", "value_b")):
            assert t.loc[target, a] == v.loc[claim, b], (target, a)
    for target, claim in list(pairs.items())[2:]:  # thresholds = the claims' tolerances: the same verdict
        assert (t.loc[target, "met"] == "yes") == (v.loc[claim, "agrees"] == "yes"), target
        assert -t.loc[target, "threshold"] == next(c.tol for c in PAPER_CLAIMS if c.name == claim)


def test_report_counts_every_measured_claim(runs_dir):
    """Six claims have test items of both sides (one of them a validated alpha = 1: a 'no'); the count says 5
    of 6."""
    from pc_clip.core.config import get_config
    from pc_clip.report.claims import PAPER_CLAIMS
    from pc_clip.report.build import write_report
    rng = np.random.default_rng(4)
    n = 400
    clip_hits = rng.random(n) < 0.5
    better = clip_hits | (rng.random(n) < 0.4)  # never worse, ~20 % more right
    parts = []
    for w in ("train", "heldout"):
        parts += [_cell_items("clip", "difference_classification", "world/size", f"wording={w}", "accuracy",
                              clip_hits),
                  _cell_items("clip-ft-captions", "difference_classification", "world/size", f"wording={w}",
                              "accuracy", clip_hits),
                  _cell_items("pc-clip", "difference_classification", "world/size", f"wording={w}",
                              "accuracy", better)]
    for m in ("clip", "pc-clip"):  # zero-shot unchanged: not worse
        parts += [_cell_items(m, "zero_shot", "world", "", "accuracy", clip_hits),
                  _cell_items(m, "zero_shot", "world", "", "worst_class_accuracy", clip_hits,
                              groups=(np.arange(n) % 4).astype(str), statistic="worst_group")]
    # comparative prompting on test at alpha 1 and 0.9; validation chose 1 (ties go to 1)
    for a in ("1", "0.9"):
        parts.append(_cell_items("pc-clip", "comparative_prompting", "world", f"alpha={a}", "accuracy",
                                 better))
    items = pd.concat(parts, ignore_index=True)
    keys = ["model", "task", "dataset", "condition", "metric", "seed"]
    results = items.groupby(keys, sort=False)["value"].mean().reset_index()
    results = results.assign(experiment="x", profile="tiny", n=n)
    val = pd.DataFrame([dict(experiment="06", profile="tiny", model="pc-clip", task="comparative_prompting",
                             dataset="world",
                             condition=f"alpha={a};split=val", metric="accuracy", value=0.7, seed=0,
                             n=n) for a in ("1", "0.9")])
    text = write_report(get_config("tiny"), pd.concat([results, val], ignore_index=True),
                        items=items).read_text()
    measured = {"difference_classification", "difference_heldout_wording", "zero_shot",
                "zero_shot_worst_class", "comparative_prompting", "baseline_captions"}
    others = [c.name for c in PAPER_CLAIMS if not c.control and c.name not in measured]
    line = (f"5 of 6 measured claims agree with the paper; {len(others)} not measured, not counted: "
            f"{', '.join(others)}.")
    assert line in text, text.split("**Controls**")[0]
    assert "no gain (validation chose alpha=1)" in text
