"""Difference generation throughput: batched vs one pair at a time, on the same model.

Prints pairs/s and generated tokens/s for both modes (it asserts nothing about speed).

    python bench/bench_generation.py                       # CPU: the tiny random Llama, loaded in 4-bit NF4
    python bench/bench_generation.py --no-4bit             # the same model in fp32
    python bench/bench_generation.py --model PATH          # any local causal LM folder
    python bench/bench_generation.py --model-shape llama2-13b   # GPU: Llama-2-13B-shaped, random, 4-bit

Every completion is forced to `--max-new-tokens` tokens (min_new_tokens = max_new_tokens), so both modes
generate exactly the same number of tokens and the comparison measures batching alone. Both modes go through
`pc_clip.differences.llm.generate_texts` (chat template, left padding, sampling at temperature 0.7, top-p
0.9).

A shaped model (`--model-shape`) is built with random weights directly on the device in bf16 and its decoder
linears are replaced by bitsandbytes NF4 `Linear4bit` layers (bf16 compute), the layers `from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))` makes; no checkpoint is
read from disk or a hub. Its tokenizer is the project's tiny stand-in (a small BPE with the Llama-2 chat
template), so prompts are somewhat longer in tokens than with the real Llama tokenizer; the prompt length is
printed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pc_clip.differences.llm import build_prompt, generate_texts, load_causal_lm, generation_batch_size
from pc_clip.differences.pairs import sample_pairs
from pc_clip.smoke.fixtures import make_tiny_llama

LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                  rms_norm_eps=1e-5)
# the same architecture at a size a CPU runs in seconds (vocab above the tiny tokenizer's 400 tokens)
LLAMA_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                  rms_norm_eps=1e-5)
SHAPES = {"llama2-13b": LLAMA2_13B, "llama-tiny": LLAMA_TINY}


def quantize_linears_4bit(model: torch.nn.Module, device: str,
                          compute_dtype=torch.bfloat16) -> torch.nn.Module:
    """Replace every nn.Linear inside the decoder layers by a bitsandbytes NF4 Linear4bit, as
    `from_pretrained` with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype=torch.bfloat16)` does (the config of `pc_clip.differences.llm.load_causal_lm`: no
    double quantisation; embeddings and lm_head stay bf16)."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            for cname, lin in list(child.named_children()):
                if type(lin) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                    weight = lin.weight.data.to("cpu" if device == "cpu" else lin.weight.device)
                    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=False).to(device)
                    if lin.bias is not None:
                        q.bias = torch.nn.Parameter(lin.bias.data.to(device), requires_grad=False)
                    setattr(child, cname, q)
    return model


def random_llama_4bit(shape: dict, device: str, layers: int | None = None, four_bit: bool = True):
    """A Llama with random weights of the given shape, built on `device` in bf16 and (by default) quantised
    to NF4."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})}, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if four_bit:
        quantize_linears_4bit(model, device)
    elif device == "cpu":
        model = model.float()
    model.generation_config.pad_token_id = 0
    return model.eval()


def run(model, tok, prompts, batch_size, max_new_tokens):
    """Seconds, pairs/s and tokens/s of `generate_texts` on `prompts` with every completion forced to
    `max_new_tokens`."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, counts = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9,
                               batch_size=batch_size, min_new_tokens=max_new_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(seconds=dt, pairs_per_s=len(prompts) / dt, tokens_per_s=len(prompts) * max_new_tokens / dt)


def bench_prompts(n: int) -> list[str]:
    "`n` difference prompts about random pairs of a small caption corpus."
    corpus = pd.DataFrame({"image_id": range(64),
                           "caption": [f"A {'large' if k % 2 else 'small'} {c} glorp on grass."
                                       for k, c in enumerate(["red", "blue", "green", "yellow"] * 16)]})
    pairs = sample_pairs(corpus, n, seed=0, mode="random")
    return [build_prompt("differences", r) for r in pairs.to_dict("records")]


def measure_generation(model: str | None = None, shape: str | None = "llama-tiny", layers: int | None = None,
                       four_bit: bool = True, device: str = "auto", n_prompts: int = 16,
                       single_prompts: int | None = None,
                       batch_size: int = 8, max_new_tokens: int = 32, log=print) -> dict:
    """Tokens/s of batched generation (`n_prompts` in batches of `batch_size`) and of one prompt at a time
    (the first `single_prompts` of them; default all), both through `generate_texts`, as one dict.
    `batch_size=0`: the batch the paper profile uses on this card
    (`pc_clip.differences.llm.generation_batch_size` from free GPU memory)."""
    if device == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev = device
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_llama(Path(tmp) / "tiny-llama")
        t0 = time.perf_counter()
        if model is None and shape is not None:
            if dev == "cpu" and shape == "llama2-13b" and not layers:
                log("note: a 40-layer 13B-shaped model on the CPU is very slow; try --layers 1 for a smoke "
                    "test")
            # the Llama-2 chat template, left padding
            _, tok = load_causal_lm(str(tiny), load_in_4bit=False, device="cpu")
            lm = random_llama_4bit(SHAPES[shape], dev, layers, four_bit)
            name = (f"{shape}-shaped ({lm.config.num_hidden_layers} layers), random weights, "
                    f"{'4-bit NF4 (bf16 compute)' if four_bit else 'bf16' if dev != 'cpu' else 'fp32'}")
        else:
            lm, tok = load_causal_lm(model or str(tiny), load_in_4bit=four_bit, device=dev)
            name = f"{model or 'tiny random llama'} ({'4-bit NF4' if four_bit else 'fp32/bf16'})"
        load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in lm.parameters())
    fitted = batch_size <= 0 and dev.startswith("cuda")
    # the paper profile's rule (gen_batch_from_memory): as many prompts as free GPU memory holds
    if batch_size <= 0:
        batch_size = generation_batch_size(lm, 32, True, max_new_tokens)
        n_prompts = max(n_prompts, batch_size)
        log(f"the paper profile's batch on this device: {batch_size} "
            + ("(fitted to free GPU memory)" if fitted else "(its gen_batch_size: no GPU memory to fit)"))
    prompts = bench_prompts(n_prompts)
    single = prompts[:single_prompts] if single_prompts else prompts
    n_prompt = len(tok(prompts[0])["input_ids"])
    log(f"model: {name}; {n_params / 1e6:.1f} M stored parameters; built in {load_s:.1f} s on {dev}")

    if dev.startswith("cuda"):  # the bf16 weights of the build are gone: count what generation itself holds
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run(lm, tok, prompts[:2], 2, 2)  # warm-up
    batched = run(lm, tok, prompts, batch_size, max_new_tokens)
    log(f"batched (bs={batch_size}): {batched['tokens_per_s']:.1f} tokens/s")
    one = run(lm, tok, single, 1, max_new_tokens)
    log(f"one at a time: {one['tokens_per_s']:.1f} tokens/s")
    # after the build
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
    return dict(model=name, device=dev, stored_params=n_params, build_s=load_s, prompts=len(prompts),
                single_prompts=len(single), batch_size=batch_size, batch_fitted=fitted,
                max_new_tokens=max_new_tokens, prompt_tokens=n_prompt, batched_s=batched["seconds"],
                batched_tokens_per_s=batched["tokens_per_s"],
                batched_pairs_per_s=batched["pairs_per_s"], single_s=one["seconds"],
                single_tokens_per_s=one["tokens_per_s"], single_pairs_per_s=one["pairs_per_s"],
                speedup=batched["tokens_per_s"] / one["tokens_per_s"], peak_gpu_mem_gib=peak_mem)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a local causal LM folder (default: build the tiny random Llama)")
    ap.add_argument("--model-shape", choices=["tiny", *SHAPES], default="tiny",
                    help="tiny: the project's tiny Llama through load_causal_lm; others: random weights of "
                         "that shape")
    ap.add_argument("--layers", type=int, help="override the number of layers of --model-shape")
    ap.add_argument("--no-4bit", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--single-pairs", type=int, default=None,
                    help="pairs for one-at-a-time (default: --n-pairs)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    r = measure_generation(a.model, None if a.model_shape == "tiny" else a.model_shape, a.layers,
                           not a.no_4bit, a.device, a.n_pairs, a.single_pairs, a.batch_size, a.max_new_tokens)
    print(f"{r['prompts']} pairs batched, {r['single_prompts']} one at a time, ~{r['prompt_tokens']} prompt "
          f"tokens "
          f"each (before the chat template), {r['max_new_tokens']} new tokens each")
    print(f"{'mode':<22}{'seconds':>10}{'pairs/s':>10}{'tokens/s':>11}")
    for mode, k in [(f"batched (bs={r['batch_size']})", "batched"), ("one pair at a time", "single")]:
        print(f"{mode:<22}{r[f'{k}_s']:>10.2f}{r[f'{k}_pairs_per_s']:>10.2f}{r[f'{k}_tokens_per_s']:>11.1f}")
    print(f"batching speed-up: {r['speedup']:.2f}x")
    if r["peak_gpu_mem_gib"] is not None:
        print(f"peak GPU memory: {r['peak_gpu_mem_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
