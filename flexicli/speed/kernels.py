"""Triton kernels for the GPU decode engine (batch 1). Imported only on CUDA machines with Triton.

The point of these kernels is device-side routing inside one CUDA graph: a kernel reads the router's flag
from device memory and does nothing when its layer is skipped, so the host never has to know. The
matrix-vector kernel (`cond_gemv`) is the expensive one; the others fuse the small per-layer ops that
would otherwise be several launches each (RMSNorm, rotary + KV-cache write, SiLU*up, router tail).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cond_gemv(W, X, Y, R, FLAG, NW, K, COND_ROWS, eps, RUN_WHEN: tl.constexpr, HAS_FLAG: tl.constexpr,
               HAS_RES: tl.constexpr, PASS_ON_SKIP: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y = W @ f(X) (+ R), f = identity, RMSNorm with weight NW (NORM: the token's rms is a scalar, so it is
    applied after the dot product, in the same pass), or silu(X[:K]) * X[K:] (GLU: a SwiGLU's down input).
    With a flag, programs whose rows lie below COND_ROWS work only if flag == RUN_WHEN; otherwise they
    return at once (their weights are never read) or, with PASS_ON_SKIP, write Y = R."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    run = True
    if HAS_FLAG:
        run = (tl.load(FLAG) == RUN_WHEN) | (pid * BLOCK_N >= COND_ROWS)
    if run:
        cols = tl.arange(0, BLOCK_K)
        ptrs = W + rows[:, None].to(tl.int64) * K + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(ptrs + k0)
            x = tl.load(X + k0 + cols).to(tl.float32)
            if NORM:
                ss += x * x
                x = x * tl.load(NW + k0 + cols).to(tl.float32)
            if GLU:
                u = tl.load(X + K + k0 + cols).to(tl.float32)
                x = (x / (1.0 + tl.exp(-x))).to(Y.dtype.element_ty).to(tl.float32) * u
                x = x.to(Y.dtype.element_ty).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            y = y * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        if HAS_RES:  # as HF: the projection is rounded to the dtype before the residual add
            y = y.to(Y.dtype.element_ty).to(tl.float32) + tl.load(R + rows).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty))
    elif PASS_ON_SKIP:
        tl.store(Y + rows, tl.load(R + rows))


def gemv_configs(n: int, k: int):
    """Block shapes that tile W [n, k] exactly (the kernel has no masks)."""
    out = []
    for bn in (4, 8, 16, 32):
        for bk in (8, 16, 32, 64, 128, 256, 512, 1024):  # powers of two (tl.arange) that divide k
            if n % bn == 0 and k % bk == 0 and bk * 4 >= min(k, 512):
                for warps in (4, 8):
                    out.append((bn, bk, warps))
    if not out:
        raise ValueError(f"no GEMV tiling for a {n}x{k} weight (needs n % 4 == 0 and a power-of-two factor of k)")
    return out


def gemv_default(shape):
    """An untuned tiling that fits: 8 rows a program, the widest K block up to 256."""
    fits = [c for c in gemv_configs(*shape) if c[2] == 4]
    return max(fits, key=lambda c: (c[0] == 8, min(c[1], 256)))


def cond_gemv(w: torch.Tensor, x: torch.Tensor, flag: torch.Tensor | None = None, run_when: int = 1,
              config=(8, 256, 4), out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              pass_on_skip: bool = False, cond_rows: int | None = None, norm: torch.Tensor | None = None,
              eps: float = 1e-6, glu: bool = False) -> torch.Tensor:
    """y = w @ f(x) (+ residual); w [n, k] contiguous; x [k] ([2k] with glu). f: RMSNorm with weight `norm`,
    or silu(x[:k]) * x[k:] with glu, or nothing. With `flag`, rows below `cond_rows` (default: all) are
    computed only if flag[0] == run_when; skipped rows are left alone, or set to `residual` if pass_on_skip.
    Two calls with opposite run_when may share `out`: exactly one of them writes it."""
    n, k = w.shape
    bn, bk, warps = config
    y = torch.empty(n, device=w.device, dtype=w.dtype) if out is None else out
    _cond_gemv[(n // bn,)](w, x, y, residual if residual is not None else y, flag if flag is not None else y,
                           norm if norm is not None else x, k, n if cond_rows is None else cond_rows, eps,
                           RUN_WHEN=run_when, HAS_FLAG=flag is not None, HAS_RES=residual is not None,
                           PASS_ON_SKIP=pass_on_skip, NORM=norm is not None, GLU=glu, BLOCK_N=bn, BLOCK_K=bk,
                           num_warps=warps)
    return y


def _graph_time(fn, weights, reps: int) -> float:
    """ms per call of fn(w), replayed from a CUDA graph (what the engine pays: no launch overhead), cycling
    through several same-shape weights so that the L2 cache does not flatter small matrices."""
    for w in weights:
        fn(w)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for w in weights:
                fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * len(weights))


def tune_gemv(weights: list[torch.Tensor], reps: int = 10) -> dict:
    """The fastest tiling for these same-shape weights, and cuBLAS's time for the same product, both timed
    inside CUDA graphs before the engine's capture: {"config", "triton_ms", "cublas_ms"}."""
    w0 = weights[0]
    x = torch.randn(w0.shape[1], device=w0.device, dtype=w0.dtype)
    y = torch.empty(w0.shape[0], device=w0.device, dtype=w0.dtype)
    timed = [(_graph_time(lambda w, c=cfg: cond_gemv(w, x, config=c, out=y), weights, reps), cfg)
             for cfg in gemv_configs(*w0.shape)]
    best = min(timed)
    return {"config": best[1], "triton_ms": best[0],
            "cublas_ms": _graph_time(lambda w: torch.nn.functional.linear(x, w), weights, reps)}


@triton.jit
def _rmsnorm(X, W, Y, N, eps, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    y = (x * r).to(Y.dtype.element_ty).to(tl.float32) * w  # as HF: normalise in fp32, cast, then scale
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.numel()
    y = torch.empty_like(x)
    _rmsnorm[(1,)](x, weight, y, n, eps, BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 2048 else 4)
    return y


@triton.jit
def _rope_cache(Q, KV, COS, SIN, POS, QOUT, KC, VC, MAXLEN, H: tl.constexpr, HKV: tl.constexpr,
                D: tl.constexpr, WITH_Q: tl.constexpr):
    """One program per head: rotate q (H heads, if WITH_Q) and k (HKV heads) at position POS; write k and v
    into the cache [HKV, MAXLEN, D]."""
    head = tl.program_id(0) + (0 if WITH_Q else H)
    pos = tl.load(POS)
    half = tl.arange(0, D // 2)
    c = tl.load(COS + pos * D + half).to(tl.float32)
    s = tl.load(SIN + pos * D + half).to(tl.float32)
    if head < H:
        x1 = tl.load(Q + head * D + half).to(tl.float32)
        x2 = tl.load(Q + head * D + D // 2 + half).to(tl.float32)
        tl.store(QOUT + head * D + half, (x1 * c - x2 * s).to(QOUT.dtype.element_ty))
        tl.store(QOUT + head * D + D // 2 + half, (x2 * c + x1 * s).to(QOUT.dtype.element_ty))
    elif head < H + HKV:
        kh = head - H
        x1 = tl.load(KV + kh * D + half).to(tl.float32)
        x2 = tl.load(KV + kh * D + D // 2 + half).to(tl.float32)
        dst = KC + (kh * MAXLEN + pos) * D
        tl.store(dst + half, (x1 * c - x2 * s).to(KC.dtype.element_ty))
        tl.store(dst + D // 2 + half, (x2 * c + x1 * s).to(KC.dtype.element_ty))
    else:
        vh = head - H - HKV
        full = tl.arange(0, D)
        tl.store(VC + (vh * MAXLEN + pos) * D + full, tl.load(KV + HKV * D + vh * D + full))


def rope_cache(q, kv, cos, sin, pos, k_cache, v_cache, heads: int, kv_heads: int, head_dim: int):
    """q [H*D] (pre-rotary; None: K/V only), kv [2*HKV*D]; cos/sin tables [max_len, D]; caches
    [HKV, max_len, D]. Returns the rotated q [H*D], or None."""
    q_out = torch.empty_like(q) if q is not None else None
    grid = ((heads if q is not None else 0) + 2 * kv_heads,)
    _rope_cache[grid](q if q is not None else kv, kv, cos, sin, pos, q_out if q is not None else kv, k_cache,
                      v_cache, k_cache.shape[1], H=heads, HKV=kv_heads, D=head_dim, WITH_Q=q is not None)
    return q_out


@triton.jit
def _silu_mul(GU, Y, N, FLAG, RUN_WHEN: tl.constexpr, HAS_FLAG: tl.constexpr, BLOCK: tl.constexpr):
    run = True
    if HAS_FLAG:
        run = tl.load(FLAG) == RUN_WHEN
    if run:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        g = tl.load(GU + i, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + N + i, mask=m, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)  # as HF: silu(g) in dtype, * up
        tl.store(Y + i, (act * u).to(Y.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor, flag=None, run_when: int = 1) -> torch.Tensor:
    n = gate_up.numel() // 2
    y = torch.empty(n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul[(triton.cdiv(n, block),)](gate_up, y, n, flag if flag is not None else y, RUN_WHEN=run_when,
                                        HAS_FLAG=flag is not None, BLOCK=block)
    return y


@triton.jit
def _router_tail(E, NW, V, BIAS, FLAG, R, eps, logit_tau, BLOCK: tl.constexpr):
    """flag = [v . tanh(rmsnorm(e)) + bias > logit(tau)]; v = head.W @ dec.W (no nonlinearity between)."""
    cols = tl.arange(0, BLOCK)
    m = cols < R
    e = tl.load(E + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(e * e, axis=0) / R + eps)
    n = (e * r).to(E.dtype.element_ty).to(tl.float32) * tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
    t = 1.0 - 2.0 / (tl.exp(2.0 * n) + 1.0)  # tanh
    logit = tl.sum(t * tl.load(V + cols, mask=m, other=0.0), axis=0) + tl.load(BIAS)
    tl.store(FLAG, (logit > logit_tau).to(tl.int32))


def router_tail(e, norm_weight, v, bias, flag, eps: float, logit_tau: float) -> None:
    r = e.numel()
    _router_tail[(1,)](e, norm_weight, v, bias, flag, r, eps, logit_tau, BLOCK=max(16, triton.next_power_of_2(r)))


@triton.jit
def _attend(Q, KC, VC, O, POS, FLAG, MAXLEN, scale, RUN_WHEN: tl.constexpr, HAS_FLAG: tl.constexpr,
            G: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Decode attention, one program per KV head (its G query heads), online softmax over positions <= POS."""
    kvh = tl.program_id(0)
    run = True
    if HAS_FLAG:
        run = tl.load(FLAG) == RUN_WHEN
    if run:
        pos = tl.load(POS)
        g = tl.arange(0, G)
        d = tl.arange(0, D)
        q = tl.load(Q + (kvh * G + g)[:, None] * D + d[None, :]).to(tl.float32) * scale
        m = tl.full((G,), float("-inf"), tl.float32)
        l = tl.zeros((G,), tl.float32)
        acc = tl.zeros((G, D), tl.float32)
        base = kvh.to(tl.int64) * MAXLEN * D
        for start in range(0, MAXLEN, BLOCK_L):
            offs = start + tl.arange(0, BLOCK_L)
            valid = offs <= pos
            k = tl.load(KC + base + offs[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(VC + base + offs[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / l[:, None]
        tl.store(O + (kvh * G + g)[:, None] * D + d[None, :], out.to(O.dtype.element_ty))


def attend(q, k_cache, v_cache, pos, scale: float, flag=None, run_when: int = 1) -> torch.Tensor:
    """q [H*D] (rotated), caches [HKV, max_len, D] -> attention output [H*D]; with a flag, only if it is set."""
    kv_heads, max_len, d = k_cache.shape
    g = q.numel() // (kv_heads * d)
    out = torch.empty_like(q)
    _attend[(kv_heads,)](q, k_cache, v_cache, out, pos, flag if flag is not None else pos, max_len, scale,
                         RUN_WHEN=run_when, HAS_FLAG=flag is not None, G=g, D=d, BLOCK_L=32, num_warps=4)
    return out
