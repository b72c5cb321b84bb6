"""GPT backbone and attention backends: causality, packing isolation, positions, config, init."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cehrx.configs import config_dir
from cehrx.model import attention as attn_mod
from cehrx.model.attention import (
    attention,
    build_packed_mask,
    flash_attn_available,
    flex_available,
    resolve_backend,
)
from cehrx.model.config import GPTConfig
from cehrx.model.packed import positions_from_cu_seqlens
from cehrx.model.transformer import GPT, RotaryEmbedding, apply_rotary

VOCAB = 97
LENGTHS = [23, 5, 41]  # three patients of one pack


def micro(**overrides: object) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64, max_seq_len=64, name="micro")
    return GPT(cfg.replace(**overrides)).eval()


def pack(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (sum(lengths),), generator=g)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return ids, cu


@pytest.fixture(params=[None, 8], ids=["dense", "banded"])
def sdpa_chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """Run a test with the dense [T, T] mask and with the banded chunked mask (chunk 8)."""
    if request.param is not None:
        monkeypatch.setattr(attn_mod, "SDPA_CHUNK", request.param)
    return request.param


# ------------------------------------------------------------------------------------ packing


@torch.no_grad()
def test_packed_equals_each_patient_alone(sdpa_chunk: int | None) -> None:
    model = micro()
    ids, cu = pack(LENGTHS)
    packed = model.lm_head_logits(model(ids, cu_seqlens=cu, max_seqlen=max(LENGTHS)))
    alone = torch.cat(
        [model.lm_head_logits(model(ids[None, a:b]))[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    )
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_is_causal_and_patients_isolated(sdpa_chunk: int | None) -> None:
    model = micro()
    ids, cu = pack(LENGTHS)
    base = model(ids, cu_seqlens=cu)
    # change one token in the middle of the last patient: earlier tokens, and every other
    # patient, must not move; the token itself and later ones of that patient must.
    t = int(cu[2]) + 10
    changed = ids.clone()
    changed[t] = (changed[t] + 1) % VOCAB
    out = model(changed, cu_seqlens=cu)
    torch.testing.assert_close(out[:t], base[:t], atol=0, rtol=0)
    assert (out[t:] - base[t:]).abs().amax(-1).min() > 0
    # change the first patient's first token: the 2nd and 3rd patients are untouched
    changed = ids.clone()
    changed[0] = (changed[0] + 1) % VOCAB
    out = model(changed, cu_seqlens=cu)
    torch.testing.assert_close(out[int(cu[1]) :], base[int(cu[1]) :], atol=0, rtol=0)


@torch.no_grad()
def test_unpacked_is_causal() -> None:
    model = micro()
    x = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(2))
    base = model.lm_head_logits(model(x))
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % VOCAB
    out = model.lm_head_logits(model(y))
    torch.testing.assert_close(out[:, :17], base[:, :17], atol=0, rtol=0)
    assert (out[:, 17] - base[:, 17]).abs().max() > 0


def test_positions_restart_per_patient() -> None:
    _, cu = pack(LENGTHS)
    pos = positions_from_cu_seqlens(cu, sum(LENGTHS))
    expected = torch.cat([torch.arange(n) for n in LENGTHS])
    assert torch.equal(pos, expected)
    # empty sequences in cu_seqlens are harmless
    cu_empty = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu_empty, 5).tolist() == [0, 1, 0, 1, 2]


def test_rotary_matches_complex_rotation() -> None:
    """Each pair (x[i], x[i + D/2]) is rotated by angle pos * base^(-2i/D) (NeoX/LLaMA layout)."""
    D, base = 8, 10000.0
    rope = RotaryEmbedding(D, 32, base)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([0, 1, 7, 20, 31])
    cos, sin = rope(pos)
    got = apply_rotary(x, cos[:, 0, 0], sin[:, 0, 0])
    freqs = base ** (-torch.arange(0, D, 2).float() / D)
    z = torch.complex(x[:, : D // 2], x[:, D // 2 :]) * torch.polar(torch.ones(5, D // 2), pos[:, None].float() * freqs)
    torch.testing.assert_close(got, torch.cat((z.real, z.imag), -1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_default_positions_match_explicit() -> None:
    model = micro(max_seq_len=128)
    ids, cu = pack(LENGTHS)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    torch.testing.assert_close(model(ids, cu_seqlens=cu), model(ids, position_ids=pos, cu_seqlens=cu), atol=0, rtol=0)
    # rotary attention only sees relative offsets, so shifting a whole patient is a no-op...
    torch.testing.assert_close(
        model(ids, position_ids=pos + 7, cu_seqlens=cu), model(ids, cu_seqlens=cu), atol=1e-5, rtol=1e-5
    )
    # ...but the positions are used: spreading them out changes the result
    assert (model(ids, position_ids=pos * 2, cu_seqlens=cu) - model(ids, cu_seqlens=cu)).abs().max() > 1e-4


def test_packed_input_errors() -> None:
    model = micro()
    ids, cu = pack(LENGTHS)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(ids, cu_seqlens=cu, max_seqlen=10)
    with pytest.raises(ValueError, match="0 to the number of packed tokens"):
        model(ids[:-1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


@torch.no_grad()
def test_kv_cache_matches_full_forward() -> None:
    model = micro()
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    full = model(x)
    cache = model.new_kv_cache(batch_size=2)
    parts = [model(x[:, :12], kv_cache=cache), model(x[:, 12:15], kv_cache=cache), model(x[:, 15:16], kv_cache=cache)]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(parts, 1), full[:, :16], atol=1e-5, rtol=1e-5)


def test_gradients_stay_within_patient() -> None:
    """The loss of one patient sends no gradient into another patient's embeddings."""
    model = micro()
    ids, cu = pack(LENGTHS)
    emb = model.wte(ids).detach().requires_grad_(True)
    # run the blocks by hand on the embedding so we can take its gradient
    pm = build_packed_mask(cu, len(ids), max(LENGTHS), "sdpa")
    rope = model.rope(positions_from_cu_seqlens(cu, len(ids)))
    h = emb
    for block in model.blocks:
        h = block(h, rope, pm)
    h[int(cu[1]) : int(cu[2])].sum().backward()  # the second patient only
    g = emb.grad.abs().sum(-1)
    assert g[: int(cu[1])].max() == 0 and g[int(cu[2]) :].max() == 0
    assert g[int(cu[1]) : int(cu[2])].min() > 0


# ------------------------------------------------------------------------------------ backends


def test_resolve_backend() -> None:
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")
    if not flash_attn_available():
        with pytest.raises(RuntimeError, match="pip install"):
            resolve_backend("flash_attn", "cuda")


def _qkv(
    T: int, H: int = 2, D: int = 16, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(4)
    return [torch.randn(T, H, D, generator=g, device=device, dtype=dtype) for _ in range(3)]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Per-patient causal attention, one patient at a time (the definition, slow on purpose)."""
    bounds = cu.tolist()
    outs = [attention(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


def test_sdpa_packed_matches_reference(sdpa_chunk: int | None) -> None:
    lengths = [1, 30, 7, 64, 2, 19]
    _, cu = pack(lengths)
    q, k, v = _qkv(sum(lengths))
    torch.testing.assert_close(
        attention(q, k, v, cu_seqlens=cu, max_seqlen=64, backend="sdpa"), _reference(q, k, v, cu), atol=1e-5, rtol=1e-5
    )


def test_banded_mask_is_used_for_long_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "SDPA_CHUNK", 8)
    _, cu = pack([20, 20, 20, 20])
    pm = build_packed_mask(cu, 80, 20, "sdpa")
    assert pm.chunk == 8 and pm.n_prev == 3 and tuple(pm.sdpa_mask.shape) == (10, 1, 8, 32)


@pytest.mark.skipif(not flex_available(), reason="torch has no torch.nn.attention.flex_attention")
def test_flex_matches_sdpa_on_cpu() -> None:
    """FlexAttention runs forward-only (eager, unfused) on CPU in torch 2.13: enough to check
    its document mask against sdpa. Its backward is CUDA-only (checked in the gpu test)."""
    _, cu = pack(LENGTHS)
    q, k, v = _qkv(sum(LENGTHS))
    flex = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend="flex")
    sdpa = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(LENGTHS), backend="sdpa")
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        attention(q.requires_grad_(True), k, v, cu_seqlens=cu, backend="flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backends_agree_on_gpu_bf16() -> None:
    lengths = [300, 17, 1000, 1, 512, 90]
    _, cu = pack(lengths)
    cu = cu.cuda()
    q, k, v = (t.requires_grad_(True) for t in _qkv(sum(lengths), H=4, D=64, dtype=torch.bfloat16, device="cuda"))
    ref = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend="sdpa")
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    backends = ["flex"] * flex_available() + ["flash_attn"] * flash_attn_available()
    if not backends:
        pytest.skip("neither flex nor flash_attn available")
    for name in backends:
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend=name)
        rel = (out.float() - ref.float()).norm() / ref.float().norm()
        assert rel < 1e-2, f"{name}: forward relative error {rel:.2e}"
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        for g, r in zip(grads, ref_grads):
            rel = (g.float() - r.float()).norm() / r.float().norm()
            assert rel < 1e-2, f"{name}: gradient relative error {rel:.2e}"


# ------------------------------------------------------------------------------------ config


def test_config_round_trip_and_validation() -> None:
    cfg = GPTConfig(vocab_size=500, n_layer=3, n_head=4, n_embd=96, attn_backend="sdpa", name="x")
    assert cfg.head_dim == 24 and cfg.intermediate_size == 256
    import json

    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="attn_backend"):
        GPTConfig(attn_backend="xformers")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="vocab_size is None"):
        GPT(GPTConfig())


SIZES = {
    "micro": (2, 64, 2, 256),
    "tiny": (4, 128, 4, 512),
    "small": (6, 384, 6, 1024),
    "base": (14, 768, 12, 2048),
    "large": (24, 1024, 16, 4096),
}


def test_model_yamls_instantiate() -> None:
    assert set(SIZES) <= {p.stem for p in (Path(config_dir()) / "model").glob("*.yaml")}
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for name, (n_layer, n_embd, n_head, max_seq_len) in SIZES.items():
            cfg = compose("config", overrides=[f"model={name}"])
            assert cfg.model.name == name
            model_cfg = instantiate(cfg.model)
            assert isinstance(model_cfg, GPTConfig)
            assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head, model_cfg.max_seq_len) == (
                n_layer,
                n_embd,
                n_head,
                max_seq_len,
            )
            assert model_cfg.vocab_size is None and model_cfg.attn_backend == "auto"
            assert GPTConfig.from_dict(model_cfg.to_dict()) == model_cfg


# ------------------------------------------------------------------------------------ structure


def test_no_biases_and_tied_embeddings() -> None:
    model = micro()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "bias" in n]
    assert model.lm_head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters(non_embedding=False)
    assert model.num_parameters() == model.num_parameters(non_embedding=False) - VOCAB * 64
    untied = micro(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() == model.num_parameters()


def test_residual_projection_init_is_scaled() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    scaled = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
        assert block.mlp.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
        assert torch.equal(block.norm_1.weight, torch.ones(cfg.n_embd))
    assert model.wte.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)


def test_flops_per_token() -> None:
    model = micro()
    c = model.config
    n = model.num_parameters() + c.vocab_size * c.n_embd
    assert model.flops_per_token(100) == 6 * n + 12 * c.n_layer * c.n_embd * 100


def test_training_step_reduces_loss() -> None:
    """A few AdamW steps on one packed batch lower the loss (the backward path works end to end)."""
    model = micro().train()
    ids, cu = pack(LENGTHS)
    labels = ids.roll(-1)
    labels[cu[1:].long() - 1] = -100  # no target across a patient boundary
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        h = model(ids, cu_seqlens=cu, max_seqlen=max(LENGTHS))
        loss = torch.nn.functional.cross_entropy(model.lm_head_logits(h), labels, ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_meta_device_build_then_reset() -> None:
    """FSDP-style init: build on meta, materialise, `reset_parameters()` gives the real init."""
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64, max_seq_len=64)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()
    ref = GPT(cfg)
    torch.testing.assert_close(model.rope.cos, ref.rope.cos)
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert model.lm_head.weight is model.wte.weight
