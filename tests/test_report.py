"""Tests of `pc_clip.report`: every result figure is drawn from the results table, intervals included."""
import io
import numpy as np
import pandas as pd
import pytest

from pc_clip.core.runtime import condition_string
from pc_clip.evaluation.runner import MODELS
from pc_clip.report.summary import RECALLS, bar_figure, model_colours


# ---- Every figure of a result is drawn from a results table and shows the 95 % interval of its rows: each figure the

RNG = np.random.default_rng(0)


def _rows(task, cells, metrics, models=MODELS, seeds=(0,)):
    rows = []
    for (dataset, condition) in cells:
        for metric in metrics:
            for k, model in enumerate(models):
                for seed in seeds:
                    v = float(np.clip(0.4 + 0.03 * k + RNG.normal(0, 0.01), 0, 1))
                    rows.append(dict(experiment="x", profile="tiny", model=model, task=task, dataset=dataset,
                                     condition=condition, metric=metric, value=v, ci_low=v - 0.05, ci_high=v + 0.04,
                                     seed=seed, n=100))
    return rows


# the calls of experiments 04, 05, 06, 07, 08, 09 and 11, on a table shaped like theirs
FIGURES = {
    "difference_classification": (dict(chance=0.5), [(f"world/{a}", f"wording={w}") for a in ("size", "count")
                                                      for w in ("train", "heldout")], ["accuracy"]),
    "zero_shot": (dict(metric="worst_class_accuracy"), [("world", ""), ("cifar100", "")], ["accuracy", "worst_class_accuracy"]),
    "comparative_prompting": (dict(metric="accuracy"), [("world", "alpha=1"), ("world", "alpha=0.85")], ["accuracy"]),
    "retrieval": (dict(metric=list(RECALLS), x="metric"), [("world", "")], list(RECALLS)),
    "geometry": (dict(metric=["accuracy", "directional_consistency"], x="metric", dataset="world"), [("world", "")],
                 ["accuracy", "directional_consistency"]),
    "linear_probe": (dict(metric="accuracy"), [("world", "C=1")], ["accuracy"]),
    "t2i_arithmetic": (dict(metric=["success_rate", "species_accuracy"], x="metric", dataset="world",
                            chance={"success_rate": 0.2}), [("world", "")], ["success_rate", "species_accuracy"]),
}


def _png(fn, *args, **kw) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig = fn(*args, **kw)
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@pytest.mark.parametrize("task", list(FIGURES))
def test_bar_figures_draw_the_tables_intervals(task, tmp_path):
    kw, cells, metrics = FIGURES[task]
    table = pd.DataFrame(_rows(task, cells, metrics, seeds=(0, 1)))
    wider = table.assign(ci_low=table["value"] - 0.15)
    a = bar_figure(table, task, tmp_path / "a.png", models=list(MODELS), title=f"{task} " * 8, **kw)
    b = bar_figure(wider, task, tmp_path / "b.png", models=list(MODELS), title=f"{task} " * 8, **kw)
    c = bar_figure(table, task, tmp_path / "c.png", models=list(MODELS), title=f"{task} " * 8, **kw)
    assert a.read_bytes() == c.read_bytes(), "the same table must give the same figure"
    assert a.read_bytes() != b.read_bytes(), f"{task}: the figure does not change with ci_low: intervals not drawn"
    none = bar_figure(table.assign(ci_low=np.nan, ci_high=np.nan), task, tmp_path / "n.png", models=list(MODELS), **kw)
    assert none.read_bytes() != a.read_bytes()  # without intervals there are no interval lines (and the caption says so)


def test_one_colour_per_model_across_figures():
    assert model_colours(["pc-clip", "clip"]) == {m: model_colours(MODELS)[m] for m in ("pc-clip", "clip")}
    assert len(set(model_colours(MODELS).values())) == len(MODELS)


def test_caption_and_axes(tmp_path):
    "Geometry's accuracy and cosine get an axis each; the caption names the interval's source."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    kw, cells, metrics = FIGURES["geometry"]
    table = pd.DataFrame(_rows("geometry", cells, metrics))
    seen = {}
    orig = Figure.savefig

    def spy(self, *a, **k):
        seen["fig"] = self
        return orig(self, *a, **k)

    Figure.savefig = spy
    try:
        bar_figure(table, "geometry", tmp_path / "g.png", models=list(MODELS), **kw)
    finally:
        Figure.savefig = orig
    fig = seen["fig"]
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in panels] == ["accuracy", "directional_consistency"]
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "95 % interval" in texts and "ci_low" in texts and "results.csv" in texts
    plt.close("all")


def test_beyond_figures_draw_intervals():
    from pc_clip.studies.noise_curve import CURVE_TASK, plot_noise_curve
    from pc_clip.studies.pretrain_difference import STUDY_TASK, plot_pretrain_study
    rows = []
    for noise in (0.0, 0.3):
        for filt in ("judge-0", "none"):
            for metric in ("difference_gain_vs_clip", "zero_shot_change_vs_clip"):
                rows.append(dict(model="pc-clip", task=CURVE_TASK, dataset="world", metric=metric, value=0.1 - noise / 10,
                                 ci_low=0.05 - noise / 10, ci_high=0.15 - noise / 10, seed=0, n=100,
                                 condition=condition_string(noise=noise, filter=filt)))
    curve = pd.DataFrame(rows)
    assert "95 % interval" in " ".join(t.get_text() for t in plot_noise_curve(curve).texts)
    assert _png(plot_noise_curve, curve) != _png(plot_noise_curve, curve.assign(ci_low=curve["ci_low"] - 0.1))
    rows = []
    for metric in ("difference_accuracy", "zero_shot_accuracy", "retrieval_recall@5_i2t"):
        for w in (0.0, 0.5):
            rows.append(dict(model="joint", task=STUDY_TASK, dataset="world", metric=metric, value=0.5 + w / 10,
                             ci_low=0.45, ci_high=0.6, seed=0, n=100, condition=condition_string(arm="joint", w=w)))
        rows.append(dict(model="ptf", task=STUDY_TASK, dataset="world", metric=metric, value=0.52, ci_low=0.47,
                         ci_high=0.57, seed=0, n=100, condition=condition_string(arm="pretrain-then-finetune", w=0.0)))
    study = pd.DataFrame(rows)
    assert "95 % interval" in " ".join(t.get_text() for t in plot_pretrain_study(study).texts)
    assert _png(plot_pretrain_study, study) != _png(plot_pretrain_study, study.assign(ci_high=study["ci_high"] + 0.1))
