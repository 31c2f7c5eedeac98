"One definition per fact: every model list and every task list of the library is derived from the registries."
import ast
import re
from pathlib import Path

import pytest

from pc_clip.core.config import PROFILES, get_config
from pc_clip.core.registry import (ABLATION_ROLES, MAIN_METRICS, MODEL_COLOURS, PAPER_EVAL_DATASETS, REGISTRY,
                                   TASK_TITLES, TASKS, ablation_models, applies, model_names, model_specs)

PKG = Path(__file__).resolve().parents[1] / "pc_clip"
TASK_WRITERS = {"result_row": 1, "evaluation_rows": 2, "success_rows": None}  # position of the task argument


def test_every_coloured_model_is_a_registry_entry_and_every_entry_has_a_colour():
    entries = {s.name for s in REGISTRY if s.reported_as is None}
    assert set(MODEL_COLOURS) == entries


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_evaluated_and_ablation_models_are_the_registry_entries_of_the_profile(profile):
    cfg = get_config(profile)
    specs = model_specs(cfg)
    assert model_names(cfg) == [s.name for s in specs if s.evaluated]
    ablations = ablation_models(cfg)
    assert sorted(ablations) == sorted(s.name for s in specs if s.ablation)
    roles = [next(s.role for s in specs if s.name == m) for m in ablations]
    # the report's order: bases, baselines, pc-clip, ...
    assert roles == sorted(roles, key=ABLATION_ROLES.index)
    assert all(applies(s, cfg) for s in REGISTRY if s.resolved(cfg).name in model_names(cfg))


def test_without_a_config_every_entry_is_listed_once():
    names = model_names()
    assert len(names) == len(set(names)) == sum(s.evaluated for s in REGISTRY)
    assert set(ablation_models()) == {s.resolved(get_config()).name for s in REGISTRY if s.ablation}


def test_the_finetune_plan_trains_registry_models_only():
    from pc_clip.training.plan import finetune_plan
    names = {s.resolved(get_config()).name for s in REGISTRY}
    assert set(finetune_plan()) <= names


def test_the_task_views_are_views_of_tasks():
    tasks = [t.name for t in TASKS]
    assert len(tasks) == len(set(tasks))
    assert list(TASK_TITLES) == [t.name for t in TASKS if t.reported]
    assert set(MAIN_METRICS) <= set(TASK_TITLES) and set(PAPER_EVAL_DATASETS) <= set(tasks)


def _literal_tasks() -> set[str]:
    "Every task name the library writes as a string literal into a results row."
    found = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in TASK_WRITERS):
                pos = TASK_WRITERS[node.func.id]
                if pos is not None and len(node.args) > pos and isinstance(node.args[pos], ast.Constant):
                    found.add(node.args[pos].value)
    return found


def test_every_task_a_results_row_names_is_a_task_entry():
    written = _literal_tasks()
    assert {"difference_classification", "zero_shot", "retrieval"} <= written  # the scan finds the writers
    assert written <= {t.name for t in TASKS}, sorted(written - {t.name for t in TASKS})
    notebooks = Path(__file__).resolve().parents[1] / "nbs" / "experiments"
    rows = set()
    for nb in notebooks.rglob("*.ipynb"):
        rows |= set(re.findall(r'result_row\(\\?"[^"\\]+\\?", \\?"([a-z_0-9]+)\\?"', nb.read_text()))
    assert rows <= {t.name for t in TASKS}, sorted(rows - {t.name for t in TASKS})
