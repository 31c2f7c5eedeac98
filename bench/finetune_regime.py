"""Which finetuning regime does the tiny profile use? An exploratory validation comparison (issue 22).

    PC_CLIP_RUNS=/tmp/fr pc-clip reproduce --profile tiny --only 01,02   # base model and differences
    PC_CLIP_RUNS=/tmp/fr python bench/finetune_regime.py [A B ...]

Each regime finetunes `pc-clip` from the run's base model on the run's difference statements; each
finetune, at full strength and averaged with the base at alpha 0.5, is scored on the world's **validation**
images with the metrics the selection rule uses (`pc_clip.training.sweep.validation_outcomes`), as changes
against the base. Test images are never touched. Wall time is printed for the budget and never used.
"""
from __future__ import annotations

import argparse
import os
import time

from pc_clip.core.config import get_config
from pc_clip.training.finetune import finetune
from pc_clip.training.state import FinetuneSettings
from pc_clip.training.plan import finetuning_inputs, weight_average_model
from pc_clip.training.sweep import validation_outcomes

FAST = dict(fused_attention=True, length_buckets=16)
REGIMES = {  # letter: (what, finetune overrides)
    "A": ("lr 2e-3, 1 epoch, 8192 pairs (the former tiny regime)",
          dict(lr=2e-3, epochs=1, max_pairs=8192, fused_attention=False, length_buckets=0)),
    "B": ("lr 1e-3, 3 epochs, every pair, decay 0.5",
          dict(lr=1e-3, epochs=3, max_pairs=None, lr_decay=0.5, **FAST)),
    "C": ("lr 5e-4, 3 epochs, every pair, decay 0.5",
          dict(lr=5e-4, epochs=3, max_pairs=None, lr_decay=0.5, **FAST)),
    "D": ("tau 0.1, lr 2e-4, 3 epochs, every pair, decay 0.5",
          dict(lr=2e-4, epochs=3, max_pairs=None, lr_decay=0.5, temperature=0.1, **FAST)),
    "E": ("tau 0.1, lr 5e-4, 3 epochs, every pair, decay 0.5",
          dict(lr=5e-4, epochs=3, max_pairs=None, lr_decay=0.5, temperature=0.1, **FAST)),
    "F": ("lr 2e-3, 2 epochs, 8192 pairs, decay 0.5 (the tiny regime)",
          dict(lr=2e-3, epochs=2, max_pairs=8192, lr_decay=0.5, **FAST)),
    "G": ("lr 1e-3, 2 epochs, 8192 pairs, decay 0.5",
          dict(lr=1e-3, epochs=2, max_pairs=8192, lr_decay=0.5, **FAST)),
    "H": ("lr 4e-3, 2 epochs, 8192 pairs, decay 0.5",
          dict(lr=4e-3, epochs=2, max_pairs=8192, lr_decay=0.5, **FAST)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("regimes", nargs="*", default=list(REGIMES))
    a = p.parse_args()
    cfg = get_config("tiny")
    inputs = finetuning_inputs(cfg, progress=False)
    base = validation_outcomes(inputs.base, inputs.tokenizer, cfg, inputs.world)
    print("base (validation):", {k: round(v[0], 3) for k, v in base.items()}, flush=True)
    out = os.path.join(os.environ.get("PC_CLIP_RUNS", "runs"), "finetune_regime")
    for key in a.regimes:
        what, kw = REGIMES[key]
        t = time.perf_counter()
        run = finetune(inputs.base, inputs.tokenizer, inputs.data["differences"],
                       FinetuneSettings.from_config(cfg, **kw), os.path.join(out, key),
                       image_embeddings=inputs.image_emb, images=inputs.images, progress=False)
        seconds = time.perf_counter() - t
        for alpha in (0.5, 1.0):
            m = run.model if alpha == 1 else weight_average_model(inputs.base, run.model, alpha)
            sc = validation_outcomes(m, inputs.tokenizer, cfg, inputs.world)
            print(f"| {key} | {what} | {alpha:g} | " + " | ".join(f"{sc[k][0] - base[k][0]:+.3f}" for k in sc)
                  + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
