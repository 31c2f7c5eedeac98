"""How much comparison language should the world's captions carry? A validation study, run once to set
`world_caption_rate`.

    # the oracle differences (shared by every rate), then the study
    PC_CLIP_RUNS=/tmp/cr pc-clip reproduce --profile tiny --only 02
    PC_CLIP_RUNS=/tmp/cr python bench/caption_rate.py --rates 0 0.25 0.5 1

Rate 0 is the plain world (`world_captions="plain"`, the ablation); a rate r > 0 scales the comparative
style's rates (norm comparisons, gallery frames, generic nouns; `pc_clip.world.shapes`). For each rate the
script pretrains the tiny base model (the profile's steps, seed and schedule), measures the vocabulary
coverage of its pretraining captions, and runs `pc-clip`'s validation search
(`pc_clip.training.sweep.run_sweep`, the profile's grid and rule). Test images are never touched. The rule,
fixed before any number was looked at: among the rates whose pretraining captions cover every word of the
training wordings (coverage 1.0), the one whose chosen `pc-clip` has the largest validation
difference-classification gain over its own base; ties go to the higher base zero-shot accuracy. Wall time
is printed for the budget and never used.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import pandas as pd
import torch

from pc_clip.core.config import get_config
from pc_clip.core.devices import pick_device
from pc_clip.training.plan import finetuning_inputs, pretrain_or_load
from pc_clip.training.sweep import run_sweep
from pc_clip.world.oracle import vocabulary_coverage
from pc_clip.world.shapes import make_world
from pc_clip.core.registry import world_options


def config_of(rate: float):
    "The tiny config of a caption rate (0: the plain world)."
    tiny = get_config("tiny")
    return tiny.replace(world_captions="plain",
                        world_caption_rate=1.0) if rate == 0 else tiny.replace(world_caption_rate=rate)


def study(rate: float) -> dict:
    cfg = config_of(rate)
    t0 = time.perf_counter()
    world = make_world(**world_options(cfg))
    _, _, history, reused = pretrain_or_load(world, cfg, device=pick_device(cfg.device))
    cov = vocabulary_coverage(world, epochs=math.ceil(history["epochs"]), seed=cfg.seed).set_index("wording")
    sweep = run_sweep(finetuning_inputs(cfg, progress=False), cfg, progress=False)
    base = {r["metric"]: r["value"] for r in sweep.records if r["model"] == "clip"}
    ch = sweep.chosen
    return dict(rate=rate, coverage_train=cov.loc["train", "coverage"],
                coverage_heldout=cov.loc["heldout", "coverage"],
                base_zero_shot=base["zero_shot_accuracy"],
                base_worst_class=base["zero_shot_worst_class_accuracy"],
                base_retrieval=base["retrieval_mean_recall"], base_difference=base["difference_accuracy"],
                chosen_lr=ch.lr, chosen_alpha=ch.alpha, diff_gain=ch.diff_gain,
                diff_gain_heldout=ch.diff_gain_heldout,
                zero_shot_change=ch.zero_shot_change, retrieval_change=ch.retrieval_change,
                feasible=bool(ch.feasible),
                best_full_strength_gain=float(sweep.table.loc[sweep.table.alpha == 1, "diff_gain"].max()),
                reused_base=reused, seconds=time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    a = p.parse_args()
    rows = []
    for rate in a.rates:
        rows.append(study(rate))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    t = pd.DataFrame(rows).set_index("rate")
    eligible = t[(t.coverage_train >= 1.0) & (t.index > 0)]
    print(t.round(3).to_string())
    if len(eligible):
        best = eligible.sort_values(["diff_gain", "base_zero_shot"], ascending=False).index[0]
        print(f"chosen world_caption_rate = {best:g} (the rule above; torch threads "
              f"{torch.get_num_threads()}, "
              f"PC_CLIP_RUNS={os.environ.get('PC_CLIP_RUNS')})")
    else:
        print("no comparative rate covers every word of the training wordings")


if __name__ == "__main__":
    main()
