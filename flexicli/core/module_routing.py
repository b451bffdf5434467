"""The forward of a routed layer whose skip unit is `module` or `mlp` (flexicli/core/units.py), a mixin of FlexiLayer.

    z = attn_norm(h)
    module: wa, ra = attn_router(z)        # a skipping token still writes its K/V (the cache stays complete)
            h = h + ra * attn_out_norm(attn(z))
    mlp:    h = h + attn_out_norm(attn(z)) # attention always runs
    x = mlp_norm(h)
    wm, rm = mlp_router(x)
    h = h + mlp_out_norm(mlp(x) if rm else adapter(x))

With gradients the hard decisions enter as `r + w - stopgrad(w)` (straight-through, as for `layer`); gate mode
"scale" scales the MLP branch by wm (run) or 1 - wm (adapter), as FlexiDepth's official layer does.

Without gradients (inference) the fast path does only a unit's due work: a token skipping attention computes its
K/V and nothing else of attention (no query, attention or o_proj: fastpath.partial_attention over the running
tokens); a token skipping the MLP reaches only the adapter. tests/test_fastpath_fuzz.py holds it to the reference.
"""

from __future__ import annotations

import torch

from .sparse_attention import partial_attention, plan_for


def _identity(x):
    return x


def _rows(idx, valid, t):
    """Flat row numbers (b * t + position) of running_index's (idx, valid)."""
    rows = idx + t * torch.arange(idx.shape[0], device=idx.device)[:, None]
    return rows[valid] if valid is not None else rows.reshape(-1)


class ModuleRouting:
    """FlexiLayer's forward for the `module` and `mlp` skip units (uses its _part, _gate, _st_gate and _ffn)."""

    def _unit_forward(self, h, z, call):
        p, state = self.parts, self.state
        soft = torch.is_grad_enabled()
        fast = state.fast_path and state.gates is None and not soft
        attn_out_norm = self._part(p.attn_out_norm) if p.attn_out_norm else _identity
        if "attn" in self.units:
            wa, ra, ca = self._gate("attn", z)
            h = self._routed_attention(h, z, wa, ra, call, fast, soft, attn_out_norm, ca)
        else:
            h = h + attn_out_norm(self._part(p.attn)(hidden_states=z, **call)[0])
        mlp_norm = self._part(p.mlp_norm)
        x = mlp_norm(h) if mlp_norm is not None else h
        wm, rm, cm = self._gate("mlp", x)
        if fast:
            return h + self._fast_mlp(x, wm, rm)
        return h + self._ffn(x, rm, wm, self._st_gate(wm, rm, x.dtype, soft, cm), soft, self._part(p.mlp_out_norm))

    def _routed_attention(self, h, z, w, run, call, fast, soft, out_norm, centre):
        attn = self._part(self.parts.attn)
        if fast and (bool(run) if run.numel() == 1 else bool(run.all())):  # nothing to skip: attention as written
            return h + out_norm(attn(hidden_states=z, **call)[0])
        plan = plan_for(attn) if fast else None
        if plan is None:  # reference: every token attends, a skipping token's output is dropped
            a = out_norm(attn(hidden_states=z, **call)[0])
            return h + self._st_gate(w, run, a.dtype, soft, centre).unsqueeze(-1) * a
        b, t, d = h.shape
        idx, valid, a = partial_attention(plan, z, run, call)  # every token's K/V; queries of the running ones
        if idx is None:
            return h
        rows, a = _rows(idx, valid, t), a[valid] if valid is not None else a.reshape(-1, d)
        flat = h.reshape(b * t, d)
        out = flat.clone()
        out.index_copy_(0, rows, flat.index_select(0, rows) + out_norm(a))
        return out.view(b, t, d)

    def _fast_mlp(self, x, w, run):
        """mlp_out_norm(mlp(x)) for running rows, mlp_out_norm(adapter(x)) for skipping ones, each only on its rows."""
        p, scale = self.parts, self.state.gate_mode == "scale"
        post = self._part(p.mlp_out_norm) if p.mlp_out_norm else _identity
        mlp = self._part(p.mlp)
        if bool(run) if run.numel() == 1 else bool(run.all()):
            y = post(mlp(x))
            return y * w.to(y.dtype).unsqueeze(-1) if scale else y
        b, t, d = x.shape
        flat, wf, r = x.reshape(b * t, d), w.reshape(b * t), run.reshape(-1)
        out = torch.empty_like(flat)
        for rows, module, factor in ((r.nonzero().squeeze(1), mlp, wf), ((~r).nonzero().squeeze(1), self.adapter,
                                                                          1 - wf)):
            if rows.numel():
                y = post(module(flat.index_select(0, rows)))
                if scale:
                    y = y * factor.index_select(0, rows).to(y.dtype).unsqueeze(-1)
                out.index_copy_(0, rows, y)
        return out.view(b, t, d)
