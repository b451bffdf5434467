"""GPU decode engine (batch 1, Llama-style layers): static KV cache, the whole step in one CUDA graph, and
routing decided on the device.

    engine = DecodeEngine(hf_model, fm=None, max_len=512)    # fm: a FlexiModel wrapping hf_model
    step = engine.graph("routed")                            # "full" | "routed" | "fixed" (+ skip_layers)
    logits = step.prefill(prompt_ids)                        # teacher-forced, one step per prompt token
    tokens = step.generate(32)                               # greedy, no host sync between tokens

Why this shape: HF's eager decode is launch-bound (~37 ms a token for Llama-3-8B on an H100 against a ~5 ms
weight-read floor), so skipping layers there buys little. In one CUDA graph the launches are cheap, but a
graph cannot branch, and reading each router's decision on the host costs a sync per layer, which eats the
gain. Here a routed layer's router writes a flag in device memory and the layer's heavy kernels
(query projection, output projection, MLP: `kernels.cond_gemv`) read it and return at once when the token
skips, while the adapter's kernels run only then. K/V are always computed and written (the cache stays
complete). The "full" graph uses cuBLAS for every projection: the ratio is against the best plain engine.

Supported: llama-style layers without q/k norms or biases (llama, mistral within its sliding window); others
raise UnsupportedModel and keep the HF path.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.errors import UnsupportedModel
from ..core.routed_layer import threshold_logit

_SUPPORTED = ("llama", "mistral")  # qwen2 has q/k/v biases, qwen3 q/k norms: not (yet) in the kernels


class _Layer:
    """One decoder layer's weights, laid out for batch-1 decode."""

    def __init__(self, layer, flexi_layer=None):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if getattr(attn, "q_norm", None) is not None or any(lin.bias is not None for lin in linears):
            raise UnsupportedModel("the decode engine covers llama-style layers without q/k norms or biases")
        self.in_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.variance_epsilon
        self.wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
        self.wkv = self.wqkv[attn.q_proj.weight.shape[0]:]  # a view: the K/V rows alone (static skip)
        self.wo = attn.o_proj.weight
        self.w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
        self.w_down = mlp.down_proj.weight
        self.routed = flexi_layer is not None
        if self.routed:
            r, a = flexi_layer.router, flexi_layer.adapter
            self.r_enc = r.enc.weight
            self.r_norm, self.r_eps = r.norm.weight, r.norm.eps
            self.r_v = (r.head.weight.float() @ r.dec.weight.float()).reshape(-1).contiguous()  # head(dec(.)) fused
            self.r_bias = r.bias.detach().float().reshape(1).clone()
            self.a_gate_up = torch.cat([a.gate_proj.weight, a.up_proj.weight]).contiguous()
            self.a_down = a.down_proj.weight


class DecodeEngine:
    def __init__(self, hf_model, fm=None, max_len: int = 512, tune: bool = True):
        cfg = hf_model.config
        if fm is not None and fm.state.gate_mode != "ste":
            raise UnsupportedModel("the decode engine implements hard routing (gate mode 'ste'), not 'scale'")
        if fm is not None and fm.config.skip_unit != "layer":
            raise UnsupportedModel(f"the decode engine routes whole layers, not skip unit {fm.config.skip_unit!r}")
        if cfg.model_type not in _SUPPORTED:
            raise UnsupportedModel(f"the GPU decode engine covers {', '.join(_SUPPORTED)}, not {cfg.model_type!r}")
        window = getattr(cfg, "sliding_window", None)
        if window and max_len > window:  # the engine's attention has no window
            raise UnsupportedModel(f"contexts past the sliding window ({window}) are not supported by the engine")
        dev = next(hf_model.parameters()).device
        if dev.type != "cuda":
            raise UnsupportedModel("the decode engine needs a CUDA device")
        self.device, self.max_len = dev, max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.threshold = fm.state.threshold if fm is not None else 0.5
        flexi = {layer.layer_index: layer for layer in fm.layers} if fm is not None else {}
        base = hf_model.model
        self.layers = []
        for i, layer in enumerate(base.layers):
            self.layers.append(_Layer(layer.base_layer if i in flexi else layer, flexi.get(i)))
        self.routed_layers = sorted(flexi)
        self.embed, self.norm, self.lm_head = base.embed_tokens.weight, base.norm.weight, hf_model.lm_head.weight
        self.norm_eps = base.norm.variance_epsilon
        dtype = self.embed.dtype
        pos = torch.arange(max_len, device=dev)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, device=dev, dtype=dtype), position_ids=pos)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        shape = (len(self.layers), self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dtype)
        self.tiling = {}
        if tune:
            self._tune()

    def _tune(self):
        """Per weight shape: the fastest Triton tiling, and whether it beats cuBLAS for plain products."""
        from .kernels import tune_gemv

        routed = [self.layers[i] for i in self.routed_layers][:8]
        names = ["wqkv", "wkv", "wo", "w_gate_up", "w_down"]
        groups = [[getattr(L, n) for L in self.layers[-8:]] for n in names] + [[self.lm_head]]
        groups += [[getattr(L, n) for L in routed] for n in ("a_gate_up", "a_down", "r_enc") if routed]
        for ws in groups:
            self.tiling[tuple(ws[0].shape)] = tune_gemv(ws)

    def _cfg(self, w):
        from .kernels import gemv_default

        t = self.tiling.get(tuple(w.shape))
        return t["config"] if t else gemv_default(w.shape)

    def _mm(self, w, x, residual=None, norm=None, eps=1e-6, glu=False):
        """A plain product w @ f(x) (+ residual), f as in kernels.cond_gemv: the tuned Triton GEMV (with the
        norm or SwiGLU fused) where it beats cuBLAS, else the small kernel and cuBLAS."""
        from . import kernels as K

        t = self.tiling.get(tuple(w.shape))
        if t and t["triton_ms"] < t["cublas_ms"]:
            return K.cond_gemv(w, x, config=t["config"], residual=residual, norm=norm, eps=eps, glu=glu)
        if norm is not None:
            x = K.rmsnorm(x, norm, eps)
        if glu:
            x = K.silu_mul(x)
        y = F.linear(x, w)
        return y if residual is None else residual + y

    # ---- one decode step, written once for every mode ------------------------------------------------------
    def step(self, tok, pos, mode: str, skip: frozenset, flags):
        from . import kernels as K

        nq = self.heads * self.head_dim
        h = self.embed.index_select(0, tok).reshape(-1)
        for i, L in enumerate(self.layers):
            if mode == "fixed" and i in skip:  # static skip: K/V into the cache, then the adapter
                K.rope_cache(None, self._mm(L.wkv, h, norm=L.in_norm, eps=L.eps), self.cos, self.sin, pos,
                             self.k_cache[i], self.v_cache[i], self.heads, self.kv_heads, self.head_dim)
                gu = self._mm(L.a_gate_up, h, norm=L.post_norm, eps=L.eps)
                h = self._mm(L.a_down, gu, glu=True, residual=h)
                continue
            if mode == "routed" and L.routed:
                h = self._routed_layer(L, i, h, pos, flags[i:i + 1])
                continue
            qkv = self._mm(L.wqkv, h, norm=L.in_norm, eps=L.eps)
            q = K.rope_cache(qkv[:nq], qkv[nq:], self.cos, self.sin, pos, self.k_cache[i], self.v_cache[i],
                             self.heads, self.kv_heads, self.head_dim)
            h = self._mm(L.wo, K.attend(q, self.k_cache[i], self.v_cache[i], pos, self.scale), residual=h)
            h = self._mm(L.w_down, self._mm(L.w_gate_up, h, norm=L.post_norm, eps=L.eps), glu=True, residual=h)
        return self._mm(self.lm_head, h, norm=self.norm, eps=self.norm_eps)

    def _routed_layer(self, L, i, h, pos, flag):
        """Router on the device -> flag; every kernel below reads it (no host sync, one graph)."""
        from . import kernels as K

        nq, cfg = self.heads * self.head_dim, self._cfg
        K.router_tail(self._mm(L.r_enc, h, norm=L.in_norm, eps=L.eps), L.r_norm, L.r_v, L.r_bias, flag, L.r_eps,
                      self._logit_tau)
        qkv = K.cond_gemv(L.wqkv, h, flag, cond_rows=nq, norm=L.in_norm, eps=L.eps, config=cfg(L.wqkv))  # K/V: always
        q = K.rope_cache(qkv[:nq], qkv[nq:], self.cos, self.sin, pos, self.k_cache[i], self.v_cache[i],
                         self.heads, self.kv_heads, self.head_dim)
        a = K.attend(q, self.k_cache[i], self.v_cache[i], pos, self.scale, flag)
        h = K.cond_gemv(L.wo, a, flag, residual=h, pass_on_skip=True, config=cfg(L.wo))  # skipped: h as is
        out = torch.empty_like(h)  # written by exactly one of: the MLP (flag 1), the adapter (flag 0)
        gu = K.cond_gemv(L.w_gate_up, h, flag, norm=L.post_norm, eps=L.eps, config=cfg(L.w_gate_up))
        K.cond_gemv(L.w_down, gu, flag, glu=True, residual=h, out=out, config=cfg(L.w_down))
        gu = K.cond_gemv(L.a_gate_up, h, flag, run_when=0, norm=L.post_norm, eps=L.eps, config=cfg(L.a_gate_up))
        K.cond_gemv(L.a_down, gu, flag, run_when=0, glu=True, residual=h, out=out, config=cfg(L.a_down))
        return out

    @property
    def _logit_tau(self) -> float:
        return threshold_logit(self.threshold)  # the same clamp as the reference path's, so both decide alike

    def graph(self, mode: str = "full", skip_layers=()) -> "StepGraph":
        if mode not in ("full", "routed", "fixed"):
            raise ValueError(f"mode must be full, routed or fixed, not {mode!r}")
        if mode != "full" and not self.routed_layers:
            raise UnsupportedModel("routed/fixed modes need a FlexiModel (routers and adapters)")
        bad = set(skip_layers) - set(self.routed_layers)
        if bad:
            raise ValueError(f"layers {sorted(bad)} are not routed")
        return StepGraph(self, mode, frozenset(skip_layers))


class StepGraph:
    """One decode step captured in a CUDA graph; its inputs (token, position) live on the device and the
    graph itself advances them, so greedy decoding is back-to-back replays with no host sync."""

    def __init__(self, engine: DecodeEngine, mode: str, skip: frozenset):
        self.engine, self.mode = engine, mode
        dev = engine.device
        self.tok = torch.zeros(1, device=dev, dtype=torch.long)
        self.pos = torch.zeros(1, device=dev, dtype=torch.long)
        self.flags = torch.ones(len(engine.layers), device=dev, dtype=torch.int32)

        def body():
            logits = engine.step(self.tok, self.pos, mode, skip, self.flags)
            self.tok.copy_(logits.argmax(-1, keepdim=True))
            self.pos.add_(1)
            return logits

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the graph compiles the kernels
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = body()
        self.reset()

    def reset(self):
        self.pos.zero_()
        self.engine.k_cache.zero_()
        self.engine.v_cache.zero_()

    def prefill(self, ids: torch.Tensor, keep_logits: bool = False):
        """Teacher-forced steps over ids [1, T] from position 0. Returns per-step logits [T, V] (and
        per-step flags [T, n_layers]) if keep_logits, else the last step's logits."""
        self.reset()
        ids = ids.reshape(-1).to(self.engine.device)
        logits, flags = [], []
        for t in range(ids.numel()):
            self.tok.copy_(ids[t:t + 1])
            self.graph.replay()
            if keep_logits:
                logits.append(self.logits.float().clone())
                flags.append(self.flags.clone())
        if keep_logits:
            return torch.stack(logits), torch.stack(flags)
        return self.logits

    def generate(self, n: int, record: bool = False):
        """n greedy tokens after prefill (the graph feeds its own argmax back). With record, also the routed
        layers' decisions per token, [n, n_routed] bool (device copies: still no host sync per token)."""
        out = torch.empty(n, device=self.engine.device, dtype=torch.long)
        flags = torch.empty(n, len(self.flags), device=self.engine.device, dtype=torch.int32) if record else None
        for t in range(n):
            out[t:t + 1].copy_(self.tok)
            self.graph.replay()
            if record:
                flags[t].copy_(self.flags)
        if record:
            return out, flags[:, self.engine.routed_layers].bool()
        return out


def engine_available(fm) -> str | None:
    """None if `fm` can decode on the GPU engine, else the reason it cannot (the caller keeps HF generate)."""
    model = fm.model
    if next(model.parameters()).device.type != "cuda":
        return "not on a CUDA device"
    if getattr(model.config, "model_type", None) not in _SUPPORTED:
        return f"the engine covers {', '.join(_SUPPORTED)}"
    if fm.state.gate_mode != "ste":
        return "the engine implements hard routing (gate mode 'ste')"
    if fm.config.skip_unit != "layer":
        return f"the engine routes whole layers (skip unit 'layer'), not {fm.config.skip_unit!r}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None
