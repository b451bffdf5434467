"""The wrapper on every family: exact at birth, cache complete when skipping, decisions recorded."""

import copy

import pytest
import torch

from conftest import FAMILIES, tiny_model
from flexicli.core.flexi_model import FlexiModel


def ids(n=12, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


def convert_tiny(family, routed=(1,), **kw):
    original = tiny_model(family)
    return original, FlexiModel.wrap(copy.deepcopy(original), routed_layers=list(routed), base_model="tiny", **kw)


# (skip unit, router kind): every unit with either router (flexicli/core/units.py)
UNITS = [("layer", "flexidepth"), ("layer", "linear"), ("module", "flexidepth"), ("module", "linear"),
         ("mlp", "flexidepth"), ("mlp", "linear")]


def greedy(model, x, n=8, **kw):
    return model.generate(x, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("unit,router", UNITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_at_birth_and_greedy_with_cache(family, unit, router):
    original, fm = convert_tiny(family, routed=(0, 1), skip_unit=unit, router=router)
    x = ids()
    with torch.no_grad():
        ref = original(x).logits
        for mode in ("routed", "run", "full"):  # fresh routers run everything; "run" forces it; "full" = base
            with fm.routing(mode):
                got = fm.model(x).logits
            assert (got - ref).abs().max().item() <= 1e-5, (family, mode)
        with fm.record() as rec:
            out = greedy(fm.model, x[:1])
        assert torch.equal(out, greedy(original, x[:1]))
    assert rec.decisions().all(), "a fresh router must run every token"


@pytest.mark.parametrize("unit", ["layer", "module", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_skip_everything_keeps_full_cache(family, unit):
    original, fm = convert_tiny(family, routed=(0, 1), skip_unit=unit)
    x = ids(batch=1)
    if unit == "mlp":  # attention still runs: only the adapter changes the output, and a fresh one adds nothing
        for layer in fm.layers:
            torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
    with torch.no_grad(), fm.routing("skip"):
        out = fm.model(x, use_cache=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == x.shape[1]
        for layer in range(2):
            keys = cache.layers[layer].keys
            assert keys.shape[-2] == min(x.shape[1], keys.shape[-2]) and torch.isfinite(keys).all()
        assert not torch.allclose(out.logits, original(x).logits, atol=1e-3), "skipping must change the output"
        with fm.record() as rec:
            gen = greedy(fm.model, x, n=5, min_new_tokens=5)  # an adapter with weights may well pick EOS
    assert gen.shape[1] == x.shape[1] + 5
    assert not rec.decisions().any()


def test_skip_drops_attention_output_and_uses_adapter():
    """A skipped token's hidden state is h + adapter(mlp_norm(h)): checked against a hand computation."""
    _, fm = convert_tiny("llama", routed=(1,))
    layer = fm.layers[0]
    torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.update(out=out))
    layer.register_forward_pre_hook(lambda m, a, kw: seen.update(inp=a[0] if a else kw["hidden_states"]),
                                    with_kwargs=True)
    with torch.no_grad(), fm.routing("skip"):
        fm.model(ids(5, 1))
    hin = seen["inp"]
    expect = hin + layer.adapter(layer.base_layer.post_attention_layernorm(hin))
    assert torch.allclose(seen["out"], expect, atol=1e-6)


def test_threshold_and_fixed_modes_decide_as_told():
    _, fm = convert_tiny("llama", routed=(0, 1))
    x = ids()
    with torch.no_grad():
        with fm.routing(threshold=1.1), fm.record() as rec:  # no gate exceeds 1.1: everything skips
            fm.model(x)
        assert not rec.decisions().any()
        with fm.routing("fixed", skip_layers={1}), fm.record() as rec:
            fm.model(x)
        d = rec.decisions()
        assert d[..., 0].all() and not d[..., 1].any()


def test_straight_through_gradient_reaches_router_only():
    _, fm = convert_tiny("llama", routed=(1,))
    fm.model.model.layers[1].adapter.down_proj.weight.data.normal_(std=0.1)
    out = fm.model(ids()).logits.square().mean()
    out.backward()
    assert all(p.grad is None for n, p in fm.model.named_parameters() if ".router." not in n and ".adapter." not in n)
    router_grads = [p.grad for p in fm.layers[0].router.parameters()]
    assert all(g is not None for g in router_grads) and any(g.abs().sum() > 0 for g in router_grads)


def test_unknown_family_names_what_it_looked_for():
    from flexicli.core.errors import UnsupportedModel
    from flexicli.core.families import LayerParts

    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModel, match="mystery.*looked for one of.*llama") as e:
        FlexiModel.wrap(model)
    assert "LayerParts" in e.value.hint
    fm = FlexiModel.wrap(model, parts=LayerParts())  # passing the parts by hand works
    with pytest.raises(UnsupportedModel, match="already converted"):
        FlexiModel.wrap(fm.model, parts=LayerParts())
    with pytest.raises(UnsupportedModel, match="no part 'feed_forward'"):
        FlexiModel.wrap(tiny_model("llama"), parts=LayerParts(mlp="feed_forward"))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_output_hidden_states_include_the_routed_layers(family):
    """transformers records hidden states with hooks on its decoder-layer class; a routed layer must still appear."""
    from conftest import tiny_model
    from flexicli.core.flexi_model import FlexiModel

    original = tiny_model(family)
    fm = FlexiModel.wrap(copy.deepcopy(original), routed_layers=[1], base_model="tiny")
    x = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(x, output_hidden_states=True).hidden_states
        got = fm.model(x, output_hidden_states=True).hidden_states  # routed: fresh routers run every token
        with fm.routing("skip"):
            skipped = fm.model(x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == len(skipped)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5
    assert not torch.allclose(skipped[-1], want[-1])  # the skipped layer's entry is its own output, not the original's
