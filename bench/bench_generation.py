"""Difference generation throughput: batched vs one pair at a time, on the same model.

Prints pairs/s and generated tokens/s for both modes (it asserts nothing about speed).

    python bench/bench_generation.py                       # CPU: the tiny random Llama, loaded in 4-bit NF4
    python bench/bench_generation.py --no-4bit             # the same model in fp32
    python bench/bench_generation.py --model PATH          # any local causal LM folder
    python bench/bench_generation.py --model-shape llama2-13b   # GPU: Llama-2-13B-shaped, random weights, 4-bit

Every completion is forced to `--max-new-tokens` tokens (min_new_tokens = max_new_tokens), so both modes
generate exactly the same number of tokens and the comparison measures batching alone.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pc_clip.diffs import build_prompt, generate_texts, load_causal_lm, make_tiny_llama, sample_pairs

LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5)


def quantize_linears_4bit(model: torch.nn.Module, device: str, compute_dtype=torch.bfloat16) -> torch.nn.Module:
    "Replace every nn.Linear inside the decoder layers by a bitsandbytes NF4 Linear4bit (as from_pretrained does)."
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            for cname, lin in list(child.named_children()):
                if type(lin) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu" if device == "cpu" else lin.weight.device),
                                                 requires_grad=False, quant_type="nf4").to(device)
                    if lin.bias is not None:
                        q.bias = torch.nn.Parameter(lin.bias.data.to(device), requires_grad=False)
                    setattr(child, cname, q)
    return model


def random_llama_4bit(shape: dict, device: str, layers: int | None = None):
    "A Llama with random weights of the given shape, built layer by layer in bf16 and quantised to NF4."
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    quantize_linears_4bit(model, device)
    model.generation_config.pad_token_id = 0
    return model.eval()


def run(model, tok, prompts, batch_size, max_new_tokens):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, counts = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9,
                               batch_size=batch_size, min_new_tokens=max_new_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(seconds=dt, pairs_per_s=len(prompts) / dt, tokens_per_s=len(prompts) * max_new_tokens / dt)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a local causal LM folder (default: build the tiny random Llama)")
    ap.add_argument("--model-shape", choices=["tiny", "llama2-13b"], default="tiny")
    ap.add_argument("--layers", type=int, help="override the number of layers of --model-shape llama2-13b")
    ap.add_argument("--no-4bit", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)

    device = "cuda" if (a.device == "auto" and torch.cuda.is_available()) else ("cpu" if a.device == "auto" else a.device)
    tmp = tempfile.TemporaryDirectory()
    tiny = make_tiny_llama(Path(tmp.name) / "tiny-llama")
    t0 = time.perf_counter()
    if a.model_shape == "llama2-13b" and not a.model:
        if device == "cpu" and not a.layers:
            print("note: a 40-layer 13B-shaped model on the CPU is very slow; try --layers 1 for a smoke test")
        _, tok = load_causal_lm(str(tiny), load_in_4bit=False, device="cpu")  # the Llama-2 chat template, tiny vocab
        model = random_llama_4bit(LLAMA2_13B, device, a.layers)
        name = f"llama2-13b-shaped ({model.config.num_hidden_layers} layers), random weights, 4-bit NF4"
    else:
        model, tok = load_causal_lm(a.model or str(tiny), load_in_4bit=not a.no_4bit, device=device)
        name = f"{a.model or 'tiny random llama'} ({'fp32/bf16' if a.no_4bit else '4-bit NF4'})"
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    corpus = pd.DataFrame({"image_id": range(64), "caption": [f"A {'large' if k % 2 else 'small'} {c} glorp on grass."
                                                               for k, c in enumerate(["red", "blue", "green", "yellow"] * 16)]})
    pairs = sample_pairs(corpus, a.n_pairs, seed=0, mode="random")
    prompts = [build_prompt("differences", r) for r in pairs.to_dict("records")]
    n_prompt = len(tok(prompts[0])["input_ids"])

    run(model, tok, prompts[:2], 2, 2)  # warm-up
    batched = run(model, tok, prompts, a.batch_size, a.max_new_tokens)
    single = run(model, tok, prompts, 1, a.max_new_tokens)
    print(f"model: {name}; {n_params / 1e6:.1f} M stored parameters; loaded in {load_s:.1f} s on {device}")
    print(f"{a.n_pairs} pairs, ~{n_prompt} prompt tokens each (before the chat template), {a.max_new_tokens} new tokens each")
    print(f"{'mode':<22}{'seconds':>10}{'pairs/s':>10}{'tokens/s':>11}")
    for mode, r in [(f"batched (bs={a.batch_size})", batched), ("one pair at a time", single)]:
        print(f"{mode:<22}{r['seconds']:>10.2f}{r['pairs_per_s']:>10.2f}{r['tokens_per_s']:>11.1f}")
    print(f"batching speed-up: {batched['pairs_per_s'] / single['pairs_per_s']:.2f}x")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    tmp.cleanup()


if __name__ == "__main__":
    main()
