"""Where transformers moves under us: one place that knows each renamed name, and fails loudly on an unknown one."""

from __future__ import annotations

import functools
import inspect

# The keyword a decoder layer receives its KV cache under: `cache` from transformers 5.24 on, `past_key_values`
# before (5.24 still accepts the old name, deprecated until 5.40). HF passes it on every call, None without a cache.
CACHE_KEYWORDS = ("cache", "past_key_values")


class CacheKeywordError(RuntimeError):
    """The layer's call carries no recognisable cache keyword: going on would drop K/V without a word."""


def layer_cache(call: dict):
    """The KV cache (or None) from a decoder layer's keyword arguments, under whichever name this transformers uses.
    Raises CacheKeywordError when neither name is there, or both are with different objects: a cache that cannot
    be found cannot be written, and a skipped token's K/V would silently go missing."""
    found = {k: call[k] for k in CACHE_KEYWORDS if k in call}
    if not found:
        raise CacheKeywordError(
            f"the decoder layer was called without any of the cache keywords {CACHE_KEYWORDS} "
            f"(got {sorted(call)}); this transformers release names it differently: "
            "add the new name to flexicli.compat.CACHE_KEYWORDS")
    values = [v for v in found.values() if v is not None]
    if len(values) == 2 and values[0] is not values[1]:
        raise CacheKeywordError(f"the decoder layer got two different caches under {tuple(found)}")
    return values[0] if values else None


def cache_kwargs(model, cache) -> dict:
    """{keyword: cache} for calling a Hugging Face model (or decoder) with a KV cache, under the name its forward takes."""
    return {_model_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _model_cache_keyword(cls) -> str:  # once per class: this runs at every decode step
    params = inspect.signature(cls.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise CacheKeywordError(f"{cls.__name__}.forward takes none of the cache keywords {CACHE_KEYWORDS}")


def output_cache(out):
    """The KV cache a model output returns: `cache` from transformers 5.24 on, `past_key_values` before."""
    for name in CACHE_KEYWORDS:
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise CacheKeywordError(f"the model output carries no cache under {CACHE_KEYWORDS}: was use_cache=True passed?")
