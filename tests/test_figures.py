"""Figures a reader can read: one colour per model in every figure, and every figure within a notebook column.

Every figure function of the workbook is drawn here on a table shaped like the default run's (14 difference
cells, every evaluated model, the alpha sweep, fifteen claims, three loss panels, the finetuning sweep) and
saved as the experiments save it (`pc_clip.core.artifacts.save_figure`).
"""
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from pc_clip.core.config import get_config
from pc_clip.core.registry import MODEL_COLOURS, PALETTE, REGISTRY, model_names
from pc_clip.core.artifacts import MAX_FIGURE_PX, save_figure
from pc_clip.report.tables import ABLATION_MODELS
from pc_clip.report.figures import (MAIN_MODELS, ablation_figure, alpha_figure, bar_figure, claims_figure,
    loss_figure)
from pc_clip.report.claims import PAPER_CLAIMS, RECALLS

MODELS = model_names(get_config("tiny"))
RNG = np.random.default_rng(0)
ATTRIBUTE_CELLS = ("species", "size", "colour", "brightness", "count", "attributes")
CELLS = ([(f"world/{a}", f"wording={w}") for a in ATTRIBUTE_CELLS for w in ("train", "heldout")]
         + [("world/species-pairs", f"pairs=heldout;wording={w}") for w in ("train", "heldout")])
GEOMETRY_METRICS = ["analogy_accuracy", "directional_consistency", "text_direction_cosine",
                    "text_direction_cosine_train_wording"]
T2I_METRICS = ["success_rate", "success_rate_train_wording", "success_rate_class_only", "species_accuracy"]


def _rows(task, cells, metrics, base=0.5):
    return [dict(experiment="x", profile="tiny", model=m, task=task, dataset=d, condition=c, metric=metric,
                 value=(v := float(np.clip(base + 0.02 * k + RNG.normal(0, 0.02), 0, 1))),
                 ci_low=v - 0.04, ci_high=v + 0.04,
                 seed=0, n=100) for d, c in cells for metric in metrics for k, m in enumerate(MODELS)]


def _table() -> pd.DataFrame:
    rows = _rows("difference_classification", CELLS, ["accuracy"])
    rows += _rows("zero_shot", [("world", "")], ["accuracy", "worst_class_accuracy"], 0.7)
    rows += _rows("retrieval", [("world", "")], list(RECALLS), 0.3)
    rows += _rows("geometry", [("world", "")], GEOMETRY_METRICS, 0.3)
    rows += _rows("linear_probe", [("world/species", ""), ("world/size", ""), ("world/count", "")],
                  ["accuracy"], 0.6)
    rows += _rows("comparative_prompting",
                  [("world", f"alpha={a:g};split=val") for a in (1.0, 0.95, 0.9, 0.85, 0.8)]
                  + [("world", "alpha=1"), ("world", "alpha=0.85")], ["accuracy"], 0.6)
    rows += _rows("t2i_arithmetic", [("world-gallery", "")], T2I_METRICS, 0.4)
    return pd.DataFrame(rows)


def _verdicts() -> pd.DataFrame:
    return pd.DataFrame([dict(claim=c.name, statement=c.statement, comparison=f"{c.model_a} vs {c.model_b}",
                              paper=c.paper, expected=c.expect, tol=c.tol, control=c.control, delta=d,
                              ci_low=d - 0.03, ci_high=d + 0.03,
                              observed="better" if d > 0.03 else "same", agrees="yes")
                         for c, d in zip(PAPER_CLAIMS, RNG.normal(0.02, 0.04, len(PAPER_CLAIMS)))])


def _losses() -> dict:
    curve = lambda k: pd.Series(2.0 / (1 + np.arange(50) / (5 + k)), index=np.arange(50) / 25)
    return {"difference (contrastive)": {m: curve(k) for k, m in enumerate(MODELS)
                                         if m.startswith("pc-clip") and "mse" not in m},
            "difference (MSE)": {"pc-clip/mse": curve(3)},
            "captions (CLIP loss)": {m: curve(k)
                                     for k, m in enumerate(["clip-ft-captions", "clip-ft-rewritten"])}}


def _pareto():
    from pc_clip.report.figures import pareto_figure
    t = pd.DataFrame([dict(model="pc-clip", lr=lr, alpha=a, diff_gain=0.1 * a * k, diff_gain_heldout=0.05 * a,
                           zero_shot_change=-0.02 * a * k, worst_class_change=-0.03 * a,
                           retrieval_change=-0.01 * a * k, chosen=(k, a) == (1, 0.5))
                      for k, lr in enumerate((1e-4, 3e-4, 1e-3)) for a in (0.25, 0.5, 1.0)])
    return pareto_figure(t)


def figures() -> dict:
    "Every figure function on a default-sized table, as the experiments call them."
    t = _table()
    return {
        "difference_classification": bar_figure(t, "difference_classification", models=list(MAIN_MODELS),
                                                chance=0.5),
        "ablations": ablation_figure(t, ABLATION_MODELS),
        "zero_shot": bar_figure(t, "zero_shot", metric="accuracy", models=MODELS),
        "comparative_alpha": alpha_figure(t, MODELS),
        "retrieval": bar_figure(t, "retrieval", metric=list(RECALLS), x="metric", models=MODELS),
        "geometry": bar_figure(t, "geometry", metric=GEOMETRY_METRICS, x="metric", dataset="world",
                               models=MODELS),
        "linear_probe": bar_figure(t, "linear_probe", metric="accuracy", models=MODELS),
        "t2i_arithmetic": bar_figure(t, "t2i_arithmetic", metric=T2I_METRICS, x="metric",
                                     dataset="world-gallery", models=MODELS, chance={"success_rate": 1 / 3}),
        "claims": claims_figure(_verdicts()[lambda v: ~v.control]),
        "finetune_loss": loss_figure(_losses(), xlabel="epoch"),
        "finetune_selection_pareto": _pareto(),
    }


@pytest.fixture(scope="module")
def drawn():
    return figures()


def _model_colours(fig) -> dict[str, set]:
    """Model -> the colours it is drawn in: legend entries, bar faces named by tick labels, lines and texts
    labelled by model."""
    seen: dict[str, set] = {}
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            if text.get_text() in PALETTE_NAMES:
                patch = hasattr(handle, "get_facecolor") and not hasattr(handle, "get_xdata")
                colour = handle.get_facecolor() if patch else handle.get_color()
                seen.setdefault(text.get_text(), set()).add(to_hex(colour))
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_yticklabels()]
        # a bar per model
        if labels and all(l in PALETTE_NAMES for l in labels) and len(ax.patches) == len(labels):
            for label, patch in zip(labels, sorted(ax.patches, key=lambda p: p.get_y())):
                seen.setdefault(label, set()).add(to_hex(patch.get_facecolor()))
    return seen


PALETTE_NAMES = set(MODELS) | set(ABLATION_MODELS) | set(MODEL_COLOURS)


def test_each_model_has_one_colour_across_all_figures(drawn):
    everywhere: dict[str, set] = {}
    for name, fig in drawn.items():
        for model, colours in _model_colours(fig).items():
            assert colours == {PALETTE[model]}, \
                f"{name}: {model} drawn in {colours}, its colour is {PALETTE[model]}"
            everywhere.setdefault(model, set()).update(colours)
    assert set(MODELS) <= set(everywhere), f"models never seen with a colour: {set(MODELS) - set(everywhere)}"
    colours = [PALETTE[m] for m in MODELS]
    assert len(set(colours)) == len(colours), "two models share a colour"


def test_every_registry_entry_has_its_own_colour():
    entries = [s for s in REGISTRY if s.reported_as is None]
    assert len({PALETTE[s.name.replace("{wavg_alpha:g}", "0.5")] for s in entries}) == len(entries)


def test_figures_fit_a_notebook_column_at_their_own_resolution(drawn, tmp_path):
    "Designed to fit (at 110 dpi), not shrunk to fit; and the saved PNG is within 1800 x 1600 px."
    for name, fig in drawn.items():
        w, h = fig.get_size_inches() * 110
        assert w <= MAX_FIGURE_PX[0] and h <= MAX_FIGURE_PX[1], f"{name}: {w:.0f} x {h:.0f} px at 110 dpi"
        size = Image.open(save_figure(fig, tmp_path / f"{name}.png")).size
        assert size[0] <= MAX_FIGURE_PX[0] and size[1] <= MAX_FIGURE_PX[1], (name, size)


def test_figure_labels_are_for_readers(drawn):
    "No snake_case on an axis, a tick or a title, and no legend over a title (legends sit outside the axes)."
    for name, fig in drawn.items():
        for ax in fig.axes:
            words = [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
            words += [t.get_text() for t in ax.get_yticklabels()]
            assert not [w for w in words if "_" in w], (name, [w for w in words if "_" in w])
            assert ax.get_legend() is None, f"{name}: a legend inside an axis can cover its title or bars"
