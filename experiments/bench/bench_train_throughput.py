"""Training throughput of the cehrx GPT (packed) vs a Hugging Face GPT-2 (padded), side by side.

    python experiments/bench/bench_train_throughput.py                       # CPU, tiny, 2 threads
    python experiments/bench/bench_train_throughput.py --steps 20 --vocab-size 30000
    python experiments/bench/bench_train_throughput.py --device cuda         # base, bf16, per backend + MFU

What is compared: one training step = forward + next-token cross-entropy + backward + AdamW
step, on the *same patients* for both models:

- cehrx `GPT` gets them packed: a budget of `--max-tokens-per-batch` real tokens, patients
  concatenated into one `[T]` stream with `cu_seqlens` (no padding at all).
- `transformers.GPT2LMHeadModel` (the CEHR-GPT reference backbone), same width / depth /
  heads / vocab / max positions, gets them the way the reference trainer batches them: padded
  to the longest patient of the batch, `attention_mask`, labels -100 on padding, loss from
  the model's own `labels=` path (sdpa attention, its fastest CPU path).

Patient lengths are drawn from a long-tailed lognormal (median `--median-len`, default 150,
sigma 0.8) clipped to `[8, seq_len]`, like CEHR-GPT sequence lengths. Throughput counts REAL
tokens only (padding is work GPT-2 does, not tokens it learns from). The two models alternate
step by step over the same batches so a noisy shared machine hurts both alike; the reported
number is the median per-step rate over the timed steps, after `--warmup` steps.
`--padded-too` adds cehrx run on GPT-2's padded batches, which separates the backbone's own
speed from the packing gain.

`--device cuda` runs the `base` size in bf16 autocast for every available attention backend
(sdpa, flex, flash_attn) and GPT-2, and reports MFU = tokens/s * flops_per_token / peak, with
`flops_per_token` from `GPT.flops_per_token` (6N + 12*L*C*S, S = mean attended span) and
`--peak-tflops` (default 989, H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gpt2_baseline import gpt2_like  # noqa: E402  (experiments/bench/gpt2_baseline.py)
from machine import cpu_name  # noqa: E402  (experiments/bench/machine.py)

from cehrx.model.config import GPTConfig, model_sizes  # noqa: E402
from cehrx.model.transformer import GPT  # noqa: E402

SIZES = model_sizes()  # configs/model/*.yaml: n_layer, n_embd, n_head


@dataclass
class Batch:
    """One set of patients, in both layouts."""

    lengths: np.ndarray
    # packed (cehrx)
    ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], -100 on each patient's last token
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    max_seqlen: int
    # padded (GPT-2)
    pad_ids: torch.Tensor  # [B, Lmax]
    pad_mask: torch.Tensor  # [B, Lmax]
    pad_labels: torch.Tensor  # [B, Lmax], -100 on padding

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.pad_ids.numel())


def make_batches(
    n: int, budget: int, seq_len: int, vocab: int, median: float, sigma: float, seed: int, device: str
) -> list[Batch]:
    """`n` batches of whole patients filling `budget` real tokens (the packer's rule: next patient
    goes in if it fits, else it opens the next batch)."""
    rng = np.random.default_rng(seed)
    batches = []
    carry: int | None = None
    for _ in range(n):
        lengths: list[int] = []
        while True:
            L = carry if carry is not None else int(np.clip(rng.lognormal(np.log(median), sigma), 8, seq_len))
            carry = None
            if lengths and sum(lengths) + L > budget:
                carry = L
                break
            lengths.append(L)
        lens = np.array(lengths)
        T, B, Lmax = int(lens.sum()), len(lens), int(lens.max())
        ids = torch.randint(1, vocab, (T,))
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.from_numpy(np.cumsum(lens)).to(torch.int32)
        labels = torch.full((T,), -100, dtype=torch.long)
        nxt = torch.ones(T, dtype=torch.bool)
        nxt[cu[1:].long() - 1] = False  # no target across a patient boundary
        labels[:-1][nxt[:-1]] = ids[1:][nxt[:-1]]
        # padded layout, right padding with id 0 as the reference collator does
        col = torch.arange(Lmax)
        mask = col[None, :] < torch.from_numpy(lens)[:, None]
        pad_ids = torch.zeros(B, Lmax, dtype=torch.long)
        pad_ids[mask] = ids
        pad_labels = torch.where(mask, pad_ids, torch.full_like(pad_ids, -100))
        batches.append(
            Batch(
                lens,
                ids.to(device),
                labels.to(device),
                cu.to(device),
                Lmax,
                pad_ids.to(device),
                mask.long().to(device),
                pad_labels.to(device),
            )
        )
    return batches


def build_ours(size: str, vocab: int, seq_len: int, backend: str, device: str) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab, max_seq_len=seq_len, attn_backend=backend, name=size, **SIZES[size])).to(
        device
    )


def build_gpt2(size: str, vocab: int, seq_len: int, device: str) -> torch.nn.Module:
    """GPT-2 of the same width/depth/heads/vocab/positions (dropout off like ours)."""
    s = SIZES[size]
    return gpt2_like(vocab, seq_len, s["n_embd"], s["n_layer"], s["n_head"]).to(device)


def step_ours(model: GPT, opt: torch.optim.Optimizer, b: Batch, amp: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        h = model(b.ids, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)
        loss = F.cross_entropy(model.lm_head_logits(h).float(), b.labels, ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_ours_padded(model: GPT, opt: torch.optim.Optimizer, b: Batch, amp: bool) -> None:
    """Ours on GPT-2's padded batches: isolates the backbone from the packing gain. Right
    padding needs no attention mask in a causal model (real tokens never see later pads)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        h = model(b.pad_ids)
        logits = model.lm_head_logits(h[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), b.pad_labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_gpt2(model: torch.nn.Module, opt: torch.optim.Optimizer, b: Batch, amp: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = model(input_ids=b.pad_ids, attention_mask=b.pad_mask, labels=b.pad_labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(models: dict[str, tuple], batches: list[Batch], warmup: int, device: str, amp: bool) -> dict[str, float | None]:
    """Alternate the models step by step over the same batches; median real tokens/s per model.

    A model that runs out of GPU memory (GPT-2's padded batches can) is reported as None and
    dropped, so the others still get measured.
    """
    rates: dict[str, list[float]] = {k: [] for k in models}
    failed: set[str] = set()
    for i, b in enumerate(batches):
        for name, (model, opt, step) in models.items():
            if name in failed:
                continue
            sync(device)
            t0 = time.perf_counter()
            try:
                step(model, opt, b, amp)
                sync(device)
            except torch.cuda.OutOfMemoryError:
                failed.add(name)
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            if i >= warmup:
                rates[name].append(b.real_tokens / (time.perf_counter() - t0))
    return {k: (None if k in failed else statistics.median(v)) for k, v in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default=None, choices=list(SIZES), help="default: tiny on CPU, base on CUDA")
    p.add_argument(
        "--seq-len", type=int, default=None, help="max patient length / positions (default 512 CPU, 2048 CUDA)"
    )
    p.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="real-token budget per batch (default 4096 CPU, 8192 CUDA)",
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--median-len", type=float, default=150.0)
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of patient lengths")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", nargs="*", default=None, help="CUDA: backends to measure (default: all available)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense: 989)"
    )
    p.add_argument(
        "--padded-too", action="store_true", help="also time cehrx on GPT-2's padded batches (backbone-only comparison)"
    )
    p.add_argument(
        "--no-gpt2", action="store_true", help="measure cehrx only (e.g. budgets where padded GPT-2 cannot fit)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    size = a.size or ("base" if cuda else "tiny")
    seq_len = a.seq_len or (2048 if cuda else 512)
    # CUDA default budget is small because GPT-2 pads ~40 patients to 2048 tokens each;
    # use --no-gpt2 --max-tokens-per-batch 65536 for cehrx's own MFU at a realistic budget.
    budget = a.max_tokens_per_batch or (8192 if cuda else 4096)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    batches = make_batches(a.warmup + a.steps, budget, seq_len, a.vocab_size, a.median_len, a.sigma, a.seed, a.device)
    timed = batches[a.warmup :]
    real = sum(b.real_tokens for b in timed)
    padded = sum(b.padded_tokens for b in timed)
    lens = np.concatenate([b.lengths for b in timed])
    span = float((lens.astype(np.float64) ** 2).sum() / lens.sum())  # mean attended span per token

    if cuda:
        from cehrx.model.attention import flash_attn_available, flex_available

        backends = a.backends or ["sdpa"] + (["flex"] if flex_available() else []) + (
            ["flash_attn"] if flash_attn_available() else []
        )
    else:
        backends = a.backends or ["sdpa"]

    models: dict[str, tuple] = {}
    ours = None
    for bk in backends:
        ours = build_ours(size, a.vocab_size, seq_len, bk, a.device)
        models[f"cehrx[{bk}]"] = (ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=cuda or None), step_ours)
    assert ours is not None
    if a.padded_too:
        padded_model = build_ours(size, a.vocab_size, seq_len, "sdpa", a.device)
        models["cehrx[padded]"] = (
            padded_model,
            torch.optim.AdamW(padded_model.parameters(), lr=1e-4, fused=cuda or None),
            step_ours_padded,
        )
    n_ours = sum(p.numel() for p in ours.parameters())
    if not a.no_gpt2:
        gpt2 = build_gpt2(size, a.vocab_size, seq_len, a.device)
        models["gpt2"] = (gpt2, torch.optim.AdamW(gpt2.parameters(), lr=1e-4, fused=cuda or None), step_gpt2)
        n_gpt2 = sum(p.numel() for p in gpt2.parameters())

    rates = run(models, batches, a.warmup, a.device, amp=cuda)

    dev = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {os.cpu_count()} cores, {a.threads} threads"
    print(f"device: {a.device} ({dev}); torch {torch.__version__}; python {platform.python_version()}")
    print(
        f"size {size}: L={SIZES[size]['n_layer']} C={SIZES[size]['n_embd']} H={SIZES[size]['n_head']} vocab={a.vocab_size} seq_len={seq_len}"
    )
    print(f"params: cehrx {n_ours / 1e6:.2f}M" + ("" if a.no_gpt2 else f", gpt2 {n_gpt2 / 1e6:.2f}M"))
    print(
        f"batches: budget {budget} real tokens, {len(timed)} timed (+{a.warmup} warmup), {len(lens)} patients, "
        f"median len {np.median(lens):.0f}, p90 {np.percentile(lens, 90):.0f}, max {lens.max()}; "
        f"GPT-2 padding overhead {padded / real:.2f}x tokens"
    )
    fpt = ours.flops_per_token(int(round(span)))
    ref = rates.get("gpt2")
    print(f"{'model':<18}{'real tok/s':>12}{'vs gpt2':>9}" + (f"{'MFU':>8}" if cuda else ""))
    for name, r in rates.items():
        if r is None:
            print(f"{name:<18}{'OOM':>12}")
            continue
        ratio = f"{r / ref:>8.2f}x" if ref else f"{'-':>9}"
        mfu = "" if not cuda else (f"{'-':>8}" if name == "gpt2" else f"{r * fpt / (a.peak_tflops * 1e12):>8.1%}")
        print(f"{name:<18}{r:>12,.0f}{ratio}{mfu}")
    if cuda:
        print(f"MFU: flops_per_token({span:.0f}) = {fpt / 1e9:.2f} GFLOP/token, peak {a.peak_tflops:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
