"""The benchmarks' GPT-2 baseline (`bench_generate.py`, `bench_train_throughput.py`): Hugging Face's
GPT-2 at the width, depth, heads, vocabulary and positions of one of ours, dropout off like ours,
sdpa attention."""

from __future__ import annotations

import torch


def gpt2_like(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, **config) -> torch.nn.Module:
    """`GPT2LMHeadModel` of that shape; `config`: further `GPT2Config` fields (e.g. `pad_token_id`)."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    g = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **config,
    )
    g._attn_implementation = "sdpa"
    return GPT2LMHeadModel(g)
