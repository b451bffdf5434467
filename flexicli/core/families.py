"""The one table of model families: where the decoder layers live and what each layer's parts are called.

Every supported decoder layer has the same shape once its parts are named:

    h = h + attn_out_norm(attn(attn_norm(h)))
    h = h + mlp_out_norm(mlp(mlp_norm(h)))

with any of the norms possibly absent (OLMo-2 has no pre-norms, Gemma adds post-norms). The router reads
`attn_norm(h)` (the layer's own pre-attention norm) or `h` itself when there is none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import UnsupportedModel


@dataclass(frozen=True)
class LayerParts:
    layers: str = "model.layers"  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str | None = "input_layernorm"
    attn_out_norm: str | None = None
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_out_norm: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerParts":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UnsupportedModel(f"unknown layer-part names {sorted(unknown)}", f"known: {sorted(known)}")
        return cls(**d)


_LLAMA = LayerParts()
_GEMMA = LayerParts(attn_out_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                    mlp_out_norm="post_feedforward_layernorm")

FAMILIES: dict[str, LayerParts] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,  # its residual dropouts are identities at inference (resid_pdrop is 0 in released configs)
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "olmo2": LayerParts(attn_norm=None, attn_out_norm="post_attention_layernorm", mlp_norm=None,
                        mlp_out_norm="post_feedforward_layernorm"),
    "gpt2": LayerParts(layers="transformer.h", attn="attn", attn_norm="ln_1", mlp_norm="ln_2"),
}

HOW_TO_PASS = (
    "pass the parts by hand: flexicli.convert(..., parts=LayerParts(layers='model.layers', attn='self_attn', "
    "mlp='mlp', attn_norm='input_layernorm', mlp_norm='post_attention_layernorm'))"
)


def parts_for(model_type: str) -> LayerParts:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"model type {model_type!r} is not in the family table (looked for one of: {', '.join(sorted(FAMILIES))})",
            HOW_TO_PASS,
        ) from None
