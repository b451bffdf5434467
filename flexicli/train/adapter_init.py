"""Fit the adapters to what the original layers do, before distillation begins.

A fresh adapter adds nothing (down_proj = 0), so the first tokens that skip a layer lose its whole update and the
distillation starts far from the teacher. Here each routed layer's adapter is fitted, on the original model's own
hidden states, to the update the layer would have made for a token that skips it:

    x      = mlp_norm(h_in)          what a skipped token's adapter sees (its attention output is dropped)
    target = h_out - h_in            the layer's whole update: attention and MLP

That is for skip unit `layer`. With `module` and `mlp` (flexicli/core/units.py) the adapter stands in for the MLP alone,
so it is fitted to the MLP's update: x = mlp_norm(h_mid), target = h_out - h_mid (h_mid: the residual stream after
the layer's attention, what the MLP router and the MLP read).

gate/up start from the base MLP's `adapter_dim` neurons that are most active on x (when the MLP is a gated
gate_proj/up_proj MLP: SiLU in Llama, Mistral, Qwen, GELU in Gemma); down_proj is then the ridge least-squares
solution of target on those activations (closed form), and a short local phase (Adam on the MSE, this layer alone:
no LM head, no other layer) fits all three together.

Families whose adapter output passes through an RMS norm (Gemma, OLMo-2's post-norms: h + post(adapter(x))) are fitted
through it: that norm only keeps a vector's direction and scales each channel by its weight s (s = post(ones)), so the
least-squares target is the update divided by s. The local phase is left out there: on Gemma-3-270M it fitted the
update far better and made static skipping worse (docs/results.md, "Adapters and router warm start"). An output norm
of another kind (one that is not scale-invariant, e.g. LayerNorm with its mean and bias) keeps the fresh adapter, and
so does any fit that reproduces less of the update than a fresh adapter (0) on the held-out tokens; the report names
those layers. Exactness at birth is unaffected: routers still start by running every token, and a token that runs
never sees the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.routed_layer import _identity
from ..core.units import adapter_unit, unit_span


def layer_pairs(fm, rows: torch.Tensor, batch_size: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per routed layer: adapter inputs x and targets, the update the adapter stands in for ([tokens, hidden] each;
    module docstring), original model."""
    from .teacher import around_routed_layers

    def grab(module, h_in, h_mid, h_out):
        before, after = unit_span(adapter_unit(module.skip_unit), h_in, h_mid, h_out)
        norm = module._part(module.parts.mlp_norm)
        return (norm(before) if norm is not None else before), after - before

    pairs = around_routed_layers(fm, rows, grab, batch_size)
    return [x for x, _ in pairs], [y for _, y in pairs]


def _neuron_init(adapter: nn.Module, mlp: nn.Module, x: torch.Tensor) -> bool:
    """Copy the gated MLP's most active neurons (by its own activation: SiLU in Llama, GELU in Gemma) into the
    adapter's gate/up; False where the MLP has no gate_proj/up_proj/act_fn. The adapter keeps its SiLU: for a GELU
    MLP the copied neurons are close, not equal, and the least squares that follows fits down_proj to them (on
    Gemma-3-270M, static skip of 4: KL 0.925 with random gate/up -> 0.717 with copied ones, docs/results.md)."""
    gate, up, act = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "act_fn"))
    if gate is None or up is None or act is None:
        return False
    a = act(nn.functional.linear(x, gate.weight.float())) * nn.functional.linear(x, up.weight.float())
    top = a.abs().mean(0).topk(adapter.gate_proj.weight.shape[0]).indices
    adapter.gate_proj.weight.copy_(gate.weight[top])
    adapter.up_proj.weight.copy_(up.weight[top])
    return True


def _rms_scale(post, hidden: int, ref: torch.Tensor) -> torch.Tensor | None:
    """The per-channel weight s of an RMS-type output norm (post(v) = s * v / rms(v)), or None where `post` is not one:
    s = post(ones) must be nonzero and predict post(v) for a random v."""
    v = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)).to(ref.device)
    with torch.no_grad():
        s = post(torch.ones(1, hidden, device=ref.device, dtype=ref.dtype)).float()[0]
        got = post(v.to(ref.dtype)).float()
    want = s * v / v.pow(2).mean(-1, keepdim=True).sqrt()
    if not bool(torch.isfinite(got).all()) or s.abs().max() == 0:
        return None
    return s if float((got - want).norm() / want.norm()) < 1e-2 else None


def _ridge_down(adapter: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    # solved in fp32 whatever the model's dtype: LU has no bf16 kernel (CPU or CUDA), and a bf16 Gram matrix would
    # lose the fit anyway
    a = (nn.functional.silu(adapter.gate_proj(x)) * adapter.up_proj(x)).float()
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], device=gram.device)
    adapter.down_proj.weight.copy_(torch.linalg.solve(gram, a.T @ y.float()).T)


def _local_fit(adapter: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int = 2048):
    params = list(adapter.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g)
            loss = (adapter(x[idx]) - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, r in zip(params, was):
        p.requires_grad_(r)


def _explained(adapter: nn.Module, x: torch.Tensor, y: torch.Tensor, post=_identity) -> float:
    """Share of the update's energy the adapter reproduces: 1 - |post(adapter(x)) - y|^2 / |y|^2."""
    with torch.no_grad():
        return float(1 - (post(adapter(x)) - y).pow(2).sum() / y.pow(2).sum())


def fit_adapters(fm, rows: torch.Tensor, max_tokens: int = 16384, ridge: float = 1e-3, local_steps: int = 200,
                 lr: float = 3e-3, progress=None) -> dict:
    """Fit every routed layer's adapter as described above on about `max_tokens` tokens of training rows, the last
    eighth held out. Returns per layer the share of the update explained on the held-out tokens, before (fresh
    adapter: 0) and after, which layers kept a fresh adapter (module docstring), and which kept random gate/up (an MLP
    with no gate_proj/up_proj/act_fn to copy neurons from)."""
    xs, ys = layer_pairs(fm, rows[:max(1, max_tokens // rows.shape[1])])
    explained, skipped, random_neurons = {}, [], []
    for i, layer in enumerate(fm.layers):
        ad = layer.adapter
        ref = next(ad.parameters())
        post = layer._part(layer.parts.mlp_out_norm) or _identity
        normed = post is not _identity
        scale = _rms_scale(post, ad.down_proj.weight.shape[0], ref) if normed else None
        if normed and scale is None:
            skipped.append(layer.layer_index)
        else:
            cut = xs[i].shape[0] * 7 // 8
            # the least-squares target in front of the output norm: y / s (safe where a channel's s is near 0)
            pre = ys[i][:cut].to(ref.device)
            if normed:
                pre = pre * scale / (scale.pow(2) + 1e-4 * scale.pow(2).mean())
            x, y, pre = xs[i].to(ref.device, ref.dtype), ys[i].to(ref.device, ref.dtype), pre.to(ref.dtype)
            with torch.no_grad():
                if not _neuron_init(ad, layer._part(layer.parts.mlp), xs[i][:cut].to(ref.device)):
                    random_neurons.append(layer.layer_index)
                _ridge_down(ad, x[:cut], pre, ridge)
            if local_steps and not normed:  # not through a norm: on Gemma the local phase lowered the MSE
                _local_fit(ad, x[:cut], y[:cut], local_steps, lr)  # (0.07-0.89 -> 0.50-0.97 of each update
                # explained) but raised the KL of static skipping, 0.925 -> 0.975 (docs/results.md); on SmolLM2 it
                # lowers both
            share = _explained(ad, x[cut:], y[cut:], post)
            if share > 0:
                explained[str(layer.layer_index)] = round(share, 3)
            else:  # worse than adding nothing: down_proj = 0 adds nothing, as a fresh adapter
                with torch.no_grad():
                    ad.down_proj.weight.zero_()
                skipped.append(layer.layer_index)
        if progress:
            progress(i + 1, len(fm.layers))
    # said, not silent: until e9cabef the copy tested isinstance(act_fn, nn.SiLU), which the SiLUActivation of
    # transformers 5.24 is not, so SmolLM2's gate/up stayed random with nothing in the log (docs/results.md)
    return {"explained_heldout": explained, "not_fitted": skipped, "random_neurons": random_neurons}
