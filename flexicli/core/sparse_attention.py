"""Inference fast path: a skipped token's work really is not done.

The reference path (FlexiLayer's own forward) runs attention and picks the MLP or the adapter per token, so
every token pays for the query, the attention and the output projection. Here, with gradients off:

    all tokens run    -> the layer as written (attention on z, MLP), nothing gathered
    some tokens skip  -> every token: K/V only (k_proj, v_proj, k_norm, rotary, cache write) + router
                         running tokens (gathered): query, attention over all K/V (causal mask), o_proj, MLP
                         skipped tokens: the adapter

The attention is rebuilt from the layer's own projections, so it covers the families whose attention is
q/k/v(or fused qkv)/o projections + optional q/k norms + rotary (llama, mistral, qwen2, qwen3, gemma3_text,
olmo2, phi3). Anything else (gemma2's logit soft-capping, gpt2's fused Conv1D) returns None from
`attention_plan` and keeps the reference path. tests/test_fastpath.py checks both paths give the same logits.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

from .compat import layer_cache


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, R] (R <= D: phi3 rotates only the first R dims of each head)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class AttentionPlan:
    """The pieces of one attention module the fast path calls separately: queries, keys/values, output."""

    def __init__(self, attn: nn.Module, q, kv, heads: int, kv_heads: int, head_dim: int):
        self.attn, self._q, self._kv = attn, q, kv
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, N, d] -> [B, heads, N, head_dim], before rotary."""
        return self._q(z).transpose(1, 2)

    def keys_values(self, z: torch.Tensor):
        """z [B, T, d] -> k, v [B, kv_heads, T, head_dim], k before rotary."""
        k, v = self._kv(z)
        return k.transpose(1, 2), v.transpose(1, 2)


def _norm_fn(norm: nn.Module | None, head_dim: int):
    """q/k norms come per head (qwen3, gemma3: weight of size head_dim) or over the whole projection (olmo2)."""
    if norm is None:
        return None, None
    per_head = getattr(norm, "weight", None) is not None and norm.weight.numel() == head_dim
    return (norm, None) if per_head else (None, norm)


def attention_plan(attn: nn.Module) -> AttentionPlan | None:
    """An AttentionPlan for this attention module, or None where the fast path does not apply."""
    cfg = getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None)
    if cfg is None or head_dim is None or not hasattr(attn, "o_proj") or not hasattr(attn, "layer_idx"):
        return None
    if getattr(attn, "attn_logit_softcapping", None) is not None:  # gemma2: SDPA cannot soft-cap
        return None
    if getattr(attn, "scaling", None) is None:
        return None
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    q_head, q_full = _norm_fn(getattr(attn, "q_norm", None), head_dim)
    k_head, k_full = _norm_fn(getattr(attn, "k_norm", None), head_dim)

    def shaped(x, n_heads, head_norm, full_norm):
        if full_norm is not None:
            x = full_norm(x)
        x = x.view(*x.shape[:-1], n_heads, head_dim)
        return head_norm(x) if head_norm is not None else x

    if hasattr(attn, "qkv_proj"):  # phi3: one fused projection; slice its weight so a skipped token never
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias  # computes the query rows
        nq = heads * head_dim
        wq, wkv = w[:nq], w[nq:]
        bq, bkv = (None, None) if b is None else (b[:nq], b[nq:])

        def q(z):
            return shaped(F.linear(z, wq, bq), heads, q_head, q_full)

        def kv(z):
            k, v = F.linear(z, wkv, bkv).split(kv_heads * head_dim, dim=-1)
            return shaped(k, kv_heads, k_head, k_full), v.view(*v.shape[:-1], kv_heads, head_dim)
    elif all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        def q(z):
            return shaped(attn.q_proj(z), heads, q_head, q_full)

        def kv(z):
            v = attn.v_proj(z)
            return shaped(attn.k_proj(z), kv_heads, k_head, k_full), v.view(*v.shape[:-1], kv_heads, head_dim)
    else:
        return None
    return AttentionPlan(attn, q, kv, heads, kv_heads, head_dim)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, AttentionPlan | None]" = weakref.WeakKeyDictionary()


def plan_for(attn: nn.Module) -> AttentionPlan | None:
    """attention_plan, built once per module (keyed weakly: a deep copy of the model gets its own)."""
    if attn not in _PLANS:
        _PLANS[attn] = attention_plan(attn)
    return _PLANS[attn]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...], idx [B, N] -> [B, N, ...]."""
    shape = idx.shape + x.shape[2:]
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def running_index(run: torch.Tensor):
    """run [B, T] bool -> (idx [B, N] positions of the running tokens, packed left; valid [B, N] or None)."""
    if run.shape[0] == 1:
        return run[0].nonzero().view(1, -1), None
    counts = run.sum(-1)
    n = int(counts.max())
    order = torch.sort((~run).to(torch.int8), dim=1, stable=True).indices[:, :n]  # running tokens first, in order
    return order, torch.arange(n, device=run.device)[None, :] < counts[:, None]


def partial_attention(plan: AttentionPlan, z, run, call: dict):
    """Write every token's K/V to the cache; attention output for the running tokens only.
    Returns (idx, valid, out [B, N, d]) or (None, None, None) when no token runs."""
    attn = plan.attn
    cos, sin = call["position_embeddings"]
    k, v = plan.keys_values(z)
    k = apply_rotary(k, cos, sin)
    cache = layer_cache(call)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    if not bool(run.any()):
        return None, None, None
    b, t = run.shape
    idx, valid = running_index(run)
    q = plan.queries(_gather_rows(z, idx))
    cos_r, sin_r = (_gather_rows(c.expand(b, *c.shape[1:]), idx) for c in (cos, sin))
    q = apply_rotary(q, cos_r, sin_r)

    mask = call.get("attention_mask")
    if mask is None:
        if t > 1:  # HF's SDPA convention without a mask: causal, the chunk's queries at key positions 0..t-1
            k, v = k[:, :, :t], v[:, :, :t]
            mask = torch.arange(t, device=z.device)[None, None, :] <= idx[:, None, :, None]
    else:
        mask = mask.expand(b, *mask.shape[1:])
        mask = mask.gather(2, idx[:, None, :, None].expand(b, mask.shape[1], idx.shape[1], mask.shape[-1]))
    gqa = plan.heads != plan.kv_heads
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
    out = attn.o_proj(out.transpose(1, 2).reshape(b, idx.shape[1], -1))
    return idx, valid, out
