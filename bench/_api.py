"""The pc_clip functions the benchmarks call, found in whichever module holds them now (modules get split)."""
from __future__ import annotations

import importlib

WHERE = {
    "difference_contrastive_loss": ("losses", "finetune"),
    "encode_text_trimmed": ("finetune", "losses", "models"),
    "set_trainable": ("finetune", "train_state", "losses"),
    "finetune": ("finetune",),
    "sample_pairs": ("diffs",),
    "build_prompt": ("llm", "diffs"),
    "generate_texts": ("llm", "diffs"),
    "load_causal_lm": ("llm", "diffs"),
    "make_tiny_llama": ("testing", "llm", "diffs"),
}


def api(name: str):
    "The pc_clip function `name` from the first of its known modules that defines it."
    tried = []
    for mod in WHERE[name]:
        try:
            m = importlib.import_module(f"pc_clip.{mod}")
        except ImportError as e:
            tried.append(f"pc_clip.{mod} ({e})")
            continue
        if hasattr(m, name):
            return getattr(m, name)
        tried.append(f"pc_clip.{mod}")
    raise ImportError(f"{name} is in none of {', '.join(tried)}: add its new module to bench/_api.py WHERE")
