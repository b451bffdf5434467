"""The teacher's side of distillation, computed once per training row instead of at every step.

The teacher is the model with routing off, and the layers before the first routed one are the same in teacher and
student (nothing there trains). So for each training row we keep two hidden states: the one entering the first routed
layer and the teacher's final one (and, for the per-layer hidden-state term, the one leaving each routed layer). A
step then runs only the routed part of the student and no teacher at all, about half the work of recomputing both.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..core.families import LayerParts


def _layers(fm) -> nn.ModuleList:
    from ..core.flexi_model import submodule

    return submodule(fm.model, LayerParts.from_dict(fm.config.parts).layers)


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer's forward pre-hook (with_kwargs) sees: positional in most families,
    the hidden_states keyword in some."""
    return args[0] if args else kwargs["hidden_states"]


class _PassThrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_first_routed(fm, hidden: torch.Tensor):
    """Inside, a decoder forward skips the layers before the first routed one and feeds `hidden` to it."""
    layers, first = _layers(fm), fm.config.routed_layers[0]
    saved = [layers[i] for i in range(first)]

    def feed(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    for i in range(first):
        layers[i] = _PassThrough()
    handle = layers[first].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(saved):
            layers[i] = layer


@contextmanager
def routed_outputs(fm):
    """Inside, every forward appends the hidden state leaving each routed layer to the yielded list, in layer order
    ([batch, tokens, hidden] each): the per-layer hidden-state term's student and teacher sides."""
    got: list[torch.Tensor] = []

    def hook(module, args, out):
        got.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(hook) for layer in fm.layers]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _mlp_entry(layer) -> nn.Module:
    """The module whose input is the residual stream between attention and MLP: the pre-MLP norm, or the MLP itself
    where there is none (OLMo-2)."""
    norm = layer._part(layer.parts.mlp_norm)
    return norm if norm is not None else layer._part(layer.parts.mlp)


@torch.no_grad()
def around_routed_layers(fm, rows: torch.Tensor, grab, batch_size: int = 8) -> list[list[torch.Tensor]]:
    """Run the original model (routing off) over `rows`; at every routed layer call grab(layer, h_in, h_mid, h_out)
    with the residual stream entering it, after its attention and leaving it ([tokens, hidden] each) and keep what
    it returns (tensors whose first dimension is the tokens). Returns, per routed layer, each returned tensor over all
    tokens (float32, CPU)."""
    device = next(fm.model.parameters()).device
    # filled in place, batch by batch: collecting the batches and concatenating them at the end held everything
    # twice, and this is the largest thing a training run holds (the warm starts: ~1 GB on SmolLM2)
    got: list[list[torch.Tensor] | None] = [None for _ in fm.layers]
    filled = [0 for _ in fm.layers]
    mids = [None for _ in fm.layers]
    handles = []
    for i, layer in enumerate(fm.layers):
        def at_mlp(module, args, kwargs, i=i):
            mids[i] = args[0] if args else next(iter(kwargs.values()))

        def hook(module, args, kwargs, out, i=i):
            h_in = _layer_input(args, kwargs).flatten(0, 1)
            h_out = (out[0] if isinstance(out, tuple) else out).flatten(0, 1)
            parts = grab(module, h_in, mids[i].flatten(0, 1), h_out)
            if got[i] is None:
                got[i] = [torch.empty((rows.numel(), *x.shape[1:]), dtype=torch.float32) for x in parts]
            n = parts[0].shape[0]
            for buf, x in zip(got[i], parts, strict=True):  # copy_ converts dtype and device: no temporary copy
                buf[filled[i]:filled[i] + n].copy_(x)
            filled[i] += n
        handles.append(_mlp_entry(layer).register_forward_pre_hook(at_mlp, with_kwargs=True))
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with fm.routing("full"):
            for i in range(0, rows.shape[0], batch_size):
                fm.model(input_ids=rows[i:i + batch_size].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if filled != [rows.numel()] * len(fm.layers):  # a layer that saw other tokens than the rows hold: say so
        raise RuntimeError(f"routed layers saw {filled} tokens, expected {rows.numel()} each")
    return got


class _Reached(Exception):
    pass


@torch.no_grad()
def first_routed_inputs(fm, rows: torch.Tensor) -> torch.Tensor:
    """The hidden state entering the first routed layer, per row ([rows, tokens, hidden]): TeacherCache.prefix's
    values, bit for bit (one row at a time, the same layers), without running the layers from there on: calibration
    needs only these, and with every layer but the first two routed the rest is ~15x the work."""
    from ..core.flexi_model import decoder_of

    ref = next(fm.model.parameters())
    decoder, first = decoder_of(fm.model), _layers(fm)[fm.config.routed_layers[0]]
    out = torch.empty((*rows.shape, fm.config.hidden_size), dtype=ref.dtype)

    def stop(module, args, kwargs):
        raise _Reached(_layer_input(args, kwargs))

    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with fm.routing("full"):
            for i in range(rows.shape[0]):
                try:
                    decoder(input_ids=rows[i:i + 1].clamp(min=0).to(ref.device))  # text.PAD: any id
                except _Reached as reached:
                    out[i] = reached.args[0][0].cpu()
                else:
                    raise RuntimeError("the first routed layer was not reached")
    finally:
        handle.remove()
    return out


def cache_bytes(fm, rows: torch.Tensor) -> int:
    ref = next(fm.model.parameters())
    return 2 * rows.numel() * fm.config.hidden_size * ref.element_size()


class TeacherCache:
    """Per training row: the hidden state entering the first routed layer and the teacher's final hidden state;
    with `layers`, also the hidden state leaving each routed layer (routed layers x the row's size: 15x on SmolLM2,
    kept only for rows a run reaches). `lazy`: rows are computed the first time a step asks for them, so a large data
    set that a run visits about once costs no up-front pass over rows it never reaches, and a row visited again
    costs nothing."""

    def __init__(self, fm, rows: torch.Tensor, batch_size: int = 8, progress=None, lazy: bool = False,
                 layers: bool = False):
        ref = next(fm.model.parameters())
        shape = (*rows.shape, fm.config.hidden_size)
        self.fm, self.rows = fm, rows
        # identical rows share one entry: `mix` repeats its conversations until they are half the rows (loop.
        # training_rows), so without this a run computes the teacher again for each copy it reaches
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long)
        self.canonical = first.scatter_reduce(0, inverse, torch.arange(rows.shape[0]), "amin")[inverse]
        self.prefix = torch.empty(shape, dtype=ref.dtype)
        self.final = torch.empty(shape, dtype=ref.dtype)
        self.filled = torch.zeros(rows.shape[0], dtype=torch.bool)
        self.layer_out: dict[int, torch.Tensor] | None = {} if layers else None  # canonical row -> [layers, T, H]
        if not lazy:
            for i in range(0, rows.shape[0], batch_size):
                todo = self.canonical[i:i + batch_size].unique()
                if (todo := todo[~self.filled[todo]]).numel():
                    self._fill(todo)
                if progress:
                    progress(min(i + batch_size, rows.shape[0]), rows.shape[0])
            copies = (self.canonical != torch.arange(rows.shape[0])).nonzero().squeeze(1)
            for part in (self.prefix, self.final):  # .prefix and .final are read by row number (calibration)
                part[copies] = part[self.canonical[copies]]
            self.filled[copies] = True

    @torch.no_grad()
    def _fill(self, idx: torch.Tensor) -> None:
        from ..core.flexi_model import decoder_of

        fm = self.fm
        ref = next(fm.model.parameters())
        decoder, first = decoder_of(fm.model), _layers(fm)[fm.config.routed_layers[0]]
        seen = {}
        grab = first.register_forward_pre_hook(
            lambda m, a, kw: seen.update(h=_layer_input(a, kw)), with_kwargs=True)
        try:
            keep = self.layer_out is not None  # the routed layers' outputs only when the term needs them
            with fm.routing("full"), (routed_outputs(fm) if keep else nullcontext([])) as outs:
                for i in idx.tolist():  # one row at a time: its values never depend on which rows came with it,
                    outs.clear()
                    out = decoder(input_ids=self.rows[i:i + 1].to(ref.device)).last_hidden_state  # so a resumed
                    self.prefix[i] = seen["h"][0].cpu()  # run fills exactly what an unbroken one did
                    self.final[i] = out[0].cpu()
                    if keep:
                        self.layer_out[i] = torch.stack([o[0] for o in outs]).cpu()
                    self.filled[i] = True
        finally:
            grab.remove()

    def lookup(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
        """(prefix, final) for these rows, and with `layers` a third: the routed layers' outputs, [layers, B, T, H]."""
        idx = self.canonical[idx]
        missing = idx[~self.filled[idx]].unique()
        if missing.numel():
            self._fill(missing)
        got = self.prefix[idx].to(device), self.final[idx].to(device)
        if self.layer_out is None:
            return got
        return *got, torch.stack([self.layer_out[i] for i in idx.tolist()], dim=1).to(device)
