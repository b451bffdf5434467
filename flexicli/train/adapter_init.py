"""Fit the adapters to what the original layers do, before distillation begins.

A fresh adapter adds nothing (down_proj = 0), so the first tokens that skip a layer lose its whole update and the
distillation starts far from the teacher. Here each routed layer's adapter is fitted, on the original model's own
hidden states, to the update the layer would have made for a token that skips it:

    x      = mlp_norm(h_in)          what a skipped token's adapter sees (its attention output is dropped)
    target = h_out - h_in            the layer's whole update: attention and MLP

That is for skip unit `layer`. With `module` and `mlp` (flexicli/core/units.py) the adapter stands in for the MLP alone,
so it is fitted to the MLP's update: x = mlp_norm(h_mid), target = h_out - h_mid (h_mid: the residual stream after
the layer's attention, what the MLP router and the MLP read).

gate/up start from the base MLP's `adapter_dim` neurons that are most active on x (when the MLP is a SiLU-gated
gate_proj/up_proj MLP, as in Llama, Mistral, Qwen); down_proj is then the ridge least-squares solution of target on
those activations (closed form), and a short local phase (Adam on the MSE, this layer alone: no LM head, no other
layer) fits all three together. Families whose adapter output passes through a norm (Gemma, OLMo-2's post-norms)
cannot be fitted this way and keep the fresh adapter; the report says so. Exactness at birth is unaffected: routers
still start by running every token, and a token that runs never sees the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

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
    """Copy the MLP's most active neurons into the adapter's gate/up; False where the MLP is not SiLU-gated."""
    gate, up, act = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "act_fn"))
    if gate is None or up is None or not isinstance(act, nn.SiLU):
        return False
    a = nn.functional.silu(nn.functional.linear(x, gate.weight.float())) * nn.functional.linear(x, up.weight.float())
    top = a.abs().mean(0).topk(adapter.gate_proj.weight.shape[0]).indices
    adapter.gate_proj.weight.copy_(gate.weight[top])
    adapter.up_proj.weight.copy_(up.weight[top])
    return True


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


def _explained(adapter: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the update's energy the adapter reproduces: 1 - |adapter(x) - y|^2 / |y|^2."""
    with torch.no_grad():
        return float(1 - (adapter(x) - y).pow(2).sum() / y.pow(2).sum())


def fit_adapters(fm, rows: torch.Tensor, max_tokens: int = 16384, ridge: float = 1e-3, local_steps: int = 200,
                 lr: float = 3e-3, progress=None) -> dict:
    """Fit every routed layer's adapter as described above on about `max_tokens` tokens of training rows, the last
    eighth held out. Returns per layer the share of the update explained on the held-out tokens, before (fresh
    adapter: 0) and after, and which layers could not be fitted."""
    xs, ys = layer_pairs(fm, rows[:max(1, max_tokens // rows.shape[1])])
    explained, skipped = {}, []
    for i, layer in enumerate(fm.layers):
        ad = layer.adapter
        if layer.parts.mlp_out_norm is not None:
            skipped.append(layer.layer_index)
        else:
            ref = next(ad.parameters())
            x, y = xs[i].to(ref.device), ys[i].to(ref.device)
            cut = x.shape[0] * 7 // 8
            with torch.no_grad():
                _neuron_init(ad, layer._part(layer.parts.mlp), x[:cut])
                _ridge_down(ad, x[:cut].to(ref.dtype), y[:cut].to(ref.dtype), ridge)
            if local_steps:
                _local_fit(ad, x[:cut].to(ref.dtype), y[:cut].to(ref.dtype), local_steps, lr)
            explained[str(layer.layer_index)] = round(_explained(ad, x[cut:].to(ref.dtype), y[cut:].to(ref.dtype)), 3)
        if progress:
            progress(i + 1, len(fm.layers))
    return {"explained_heldout": explained, "not_fitted": skipped}
