"""Generation throughput: cehrx sampler with its KV cache vs full-prefix recompute vs Hugging Face.

    python experiments/bench/bench_generate.py                                  # CPU: tiny, 64 x 512, 2 threads
    python experiments/bench/bench_generate.py --vocab-size 2901                # a real (Synthea/GiBleed) vocab size
    python experiments/bench/bench_generate.py --device cuda --model base --batch 256   # GPU, bf16

What is compared, on the same batch of `--batch` 4-token demographic prompts, each continued
by exactly `--new-tokens` tokens (plain sampling: temperature 1, no top-k/top-p, stop tokens
off so every method does the same work):

- **cehrx, KV cache**: `cehrx.sampling.Engine.sample` (prefill once, one `[B, 1]` step per
  token through the cache, inverse-CDF draws).
- **cehrx, recompute**: the same sampler with `use_cache=False`: every step runs the whole
  prefix `[B, L]` again (same weights, same draws), the baseline the cache is measured against.
- **HF GPT-2 generate**: `transformers.GPT2LMHeadModel` of the same width / depth / heads /
  vocabulary / positions, `generate(do_sample=True, top_k=0, use_cache=True,
  min_new_tokens=max_new_tokens)`: the reference CEHR-GPT implementation's path.
- **cehrx, constrained + stops** (extra line): the realistic setting (grammar mask, rows stop at
  `[END]`/`[DEATH]` and leave the batch); tokens/s counts the tokens actually generated.

Random-init weights (throughput does not depend on them) unless `--model-dir` loads a trained
model and its vocabulary. Without `--vocab`, a synthetic vocabulary with the real token kinds
(demographics, visits, gaps, inpatient time, deciles) padded with codes to `--vocab-size`.
tokens/s = generated tokens / wall time of the whole call (prefill included), best of
`--repeats` rounds after one short warmup call per method; within a round the methods run one
after the other, so on a shared machine load swings hit all methods (best-of is the least
noisy estimate of what the code can do).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gpt2_baseline import gpt2_like  # noqa: E402  (experiments/bench/gpt2_baseline.py)
from machine import cpu_name  # noqa: E402  (experiments/bench/machine.py)

from cehrx.data.vocab import SPECIAL_TOKENS, Vocab, kind_of  # noqa: E402
from cehrx.model.config import GPTConfig, model_sizes  # noqa: E402
from cehrx.model.transformer import GPT  # noqa: E402
from cehrx.sampling import Engine, SamplingConfig  # noqa: E402

SIZES = model_sizes()  # configs/model/*.yaml: n_layer, n_embd, n_head


def synthetic_vocab(size: int) -> Vocab:
    """A vocabulary with every token kind of DESIGN §4, filled up to `size` with codes."""
    toks = list(SPECIAL_TOKENS)
    toks += [f"YEAR//{y}" for y in range(1950, 2025)] + [f"AGE//{a}" for a in range(100)] + ["AGE//UNKNOWN"]
    toks += [
        "GENDER//F",
        "GENDER//M",
        "RACE//1",
        "RACE//2",
        "VISIT//OP",
        "VISIT//IP",
        "VISIT//ER",
        "DISCHARGE//1",
        "DISCHARGE//2",
    ]
    toks += [f"D{n}" for n in range(1080)] + [f"Y{n}" for n in range(3, 21)]
    toks += [f"i-D{n}" for n in range(1, 31)] + [f"i-H{n}" for n in range(24)] + [f"Q{k}" for k in range(1, 11)]
    if size < len(toks) + 1:
        raise SystemExit(f"--vocab-size must be > {len(toks)} (the non-code tokens)")
    toks += [f"CODE/{i}" for i in range(size - len(toks))]
    n = len(toks)
    return Vocab(toks, [kind_of(t) for t in toks], [1] * n, [1] * n, [None] * n, meta={"inpatient_visit_types": ["IP"]})


def demographic_prompts(vocab: Vocab, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    by_kind = {
        k: np.array([i for i, kk in enumerate(vocab.kinds) if kk == k]) for k in ("year", "age", "gender", "race")
    }
    p = np.stack([rng.choice(by_kind[k], n) for k in ("year", "age", "gender", "race")], axis=1)
    return p.reshape(-1).astype(np.int64), np.arange(0, 4 * n + 1, 4, dtype=np.int64)


def build_gpt2(cfg: GPTConfig) -> torch.nn.Module:
    """GPT-2 of the same width/depth/heads/vocab/positions (dropout off like ours), sdpa attention."""
    return gpt2_like(cfg.vocab_size, cfg.max_seq_len, cfg.n_embd, cfg.n_layer, cfg.n_head, pad_token_id=0).eval()


def hf_generate(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, seed: int) -> int:
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    return int(out.shape[0] * (out.shape[1] - prompts.shape[1]))


def timed(fn: Callable[[], int], device: str, repeats: int) -> tuple[float, int]:
    """Best tokens/s over `repeats` calls of `fn` (which returns the tokens it generated)."""
    best, n_tok = 0.0, 0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        n_tok = fn()
        sync(device)
        best = max(best, n_tok / (time.perf_counter() - t0))
    return best, n_tok


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=list(SIZES), help="model size (random init)")
    p.add_argument("--model-dir", default=None, help="a trained model dir (cehrx export) instead of random init")
    p.add_argument("--batch", type=int, default=64, help="patients generated together")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--vocab", default=None, help="a vocab.json (default: synthetic, --vocab-size tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-recompute", action="store_true", help="skip the full-recompute baseline (slow: O(new_tokens^2))"
    )
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face GPT-2 generate")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32

    if a.model_dir:
        from cehrx.model.export import load_pretrained

        model, vocab = load_pretrained(a.model_dir, map_location=a.device)
        cfg = model.config
    else:
        vocab = Vocab.load(a.vocab) if a.vocab else synthetic_vocab(a.vocab_size)
        cfg = GPTConfig(vocab_size=len(vocab), max_seq_len=max(512, 4 + a.new_tokens), name=a.model, **SIZES[a.model])
        torch.manual_seed(a.seed)
        model = GPT(cfg)
    if cfg.max_seq_len < 4 + a.new_tokens:
        raise SystemExit(f"the model's max_seq_len={cfg.max_seq_len} is shorter than 4 + --new-tokens")
    model = model.to(a.device, dtype).eval()
    tokens, offsets = demographic_prompts(vocab, a.batch, a.seed)

    def ours(use_cache: bool, n_new: int, constrained: bool = False, stops: bool = False) -> Callable[[], int]:
        scfg = SamplingConfig(max_new_tokens=n_new, constrained=constrained, batch_size=a.batch, seed=a.seed)
        engine = Engine(model, vocab, scfg, stop_ids=None if stops else ())

        def run() -> int:
            s = engine.sample(tokens, offsets, progress=False, use_cache=use_cache)
            return int(s.lengths().sum())

        return run

    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"{cpu_name()}, {a.threads} threads"
    print(f"device: {a.device} ({dev}); torch {torch.__version__}; python {platform.python_version()}; dtype {dtype}")
    print(
        f"model: {cfg.name} ({cfg.n_layer} x {cfg.n_embd}, {cfg.n_head} heads), vocab {len(vocab)}, "
        f"{model.num_parameters(non_embedding=False) / 1e6:.2f}M params; batch {a.batch} x {a.new_tokens} new tokens"
    )
    rows: dict[str, tuple[float, int]] = {}
    methods: list[tuple[str, Callable[[int], Callable[[], int]]]] = [("cehrx KV cache", lambda n: ours(True, n))]
    if not a.no_hf:
        gpt2 = build_gpt2(cfg).to(a.device, dtype)
        prompts_t = torch.from_numpy(tokens.reshape(a.batch, 4)).to(a.device)
        methods.append(("HF GPT-2 generate (use_cache)", lambda n: lambda: hf_generate(gpt2, prompts_t, n, a.seed)))
        print(f"gpt2: {sum(q.numel() for q in gpt2.parameters()) / 1e6:.2f}M params")
    if not a.no_recompute:
        methods.append(("cehrx recompute (no cache)", lambda n: ours(False, n)))
    methods.append(("cehrx KV cache, constrained + stops", lambda n: ours(True, n, constrained=True, stops=True)))
    for _, make in methods:
        make(8)()  # warmup: allocator, kernels, HF generation config
    for r in range(a.repeats):  # methods alternate, so load from other processes hits them alike
        for name, make in methods:
            tps, n_tok = timed(make(a.new_tokens), a.device, 1)
            rows[name] = (max(tps, rows.get(name, (0.0, 0))[0]), n_tok)
            print(f"  [{r + 1}/{a.repeats}] {name:38s} {tps:>12,.0f} tokens/s  ({n_tok:,} tokens)", flush=True)

    base = rows["cehrx KV cache"][0]
    print("\n| method | generated tokens/s | cehrx KV cache is |\n|---|---:|---:|")
    for name, (tps, _) in rows.items():
        print(f"| {name} | {tps:,.0f} | {base / tps:.2f}x |")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"args": vars(a), "device": dev, "tokens_per_s": {k: v[0] for k, v in rows.items()}}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
