"""The inference fast path: same logits as the reference path (same decisions), and skipped work not done."""

import copy

import pytest
import torch

from conftest import FAMILIES, tiny_model
from flexicli.core.sparse_attention import plan_for
from flexicli.core.flexi_model import FlexiModel

COVERED = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "olmo2", "phi3"}  # others: reference path


def mixed_model(family, gate_mode="ste", seed=0, skip_unit="layer", router="flexidepth"):
    """Tiny model, both layers routed, routers and adapters perturbed so that decisions are mixed."""
    fm = FlexiModel.wrap(tiny_model(family), routed_layers=[0, 1], base_model="tiny", gate_mode=gate_mode,
                         skip_unit=skip_unit, router=router)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fm.layers:
            for r in layer.routers.values():
                w = r.head.weight if router == "flexidepth" else r.proj.weight
                w.copy_(torch.randn(w.shape, generator=g) * (2 if router == "flexidepth" else 0.5))
                (r.bias if router == "flexidepth" else r.proj.bias).zero_()
            layer.adapter.down_proj.weight.copy_(torch.randn(layer.adapter.down_proj.weight.shape, generator=g) * 0.1)
    return fm


UNITS = [("layer", "flexidepth"), ("module", "flexidepth"), ("module", "linear"), ("mlp", "flexidepth")]


def ids(n=20, batch=2, seed=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def both_paths(fm, fn):
    out = {}
    for fast in (True, False):
        fm.state.fast_path = fast
        with torch.no_grad(), fm.record() as rec:
            out[fast] = (fn(), rec.decisions())
    fm.state.fast_path = True
    return out[True], out[False]


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_covers_the_expected_families(family):
    fm = mixed_model(family)
    attn = getattr(fm.layers[0].base_layer, fm.config.parts["attn"])
    assert (plan_for(attn) is not None) == (family in COVERED)


@pytest.mark.parametrize("unit,router", UNITS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate_mode", ["ste", "scale"])
def test_prefill_logits_equal_reference_with_padding(family, gate_mode, unit, router):
    fm = mixed_model(family, gate_mode, skip_unit=unit, router=router)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding on the second row: the gathered mask rows must carry it
    (fast, d_fast), (ref, d_ref) = both_paths(fm, lambda: fm.model(x, attention_mask=mask).logits)
    assert torch.equal(d_fast, d_ref)
    assert d_fast.any() and not d_fast.all(), "the test needs mixed decisions"
    assert (fast - ref).abs().max().item() < 1e-4, family


@pytest.mark.parametrize("unit", ["layer", "module", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_with_cache_equals_reference(family, unit):
    x = ids(batch=1, n=12)
    for seed in range(4):  # the first perturbation whose decode steps decide mixed (seed 0 for every `layer` case)
        fm = mixed_model(family, skip_unit=unit, seed=seed)

        def gen():
            out = fm.model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True,
                                    return_dict_in_generate=True)
            return out.sequences, torch.stack(out.scores)

        ((seq_f, scores_f), d_fast), ((seq_r, scores_r), d_ref) = both_paths(fm, gen)
        assert torch.equal(seq_f, seq_r) and torch.equal(d_fast, d_ref)
        if d_fast[:, 12:].any() and not d_fast[:, 12:].all():
            break
    assert d_fast[:, 12:].any() and not d_fast[:, 12:].all(), "decode steps need mixed decisions"
    assert (scores_f - scores_r).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode,kw", [("skip", {}), ("fixed", {"skip_layers": {1}}), ("run", {})])
def test_forced_modes_equal_reference(mode, kw):
    fm = mixed_model("qwen3")
    x = ids()
    with fm.routing(mode, **kw):
        (fast, _), (ref, _) = both_paths(fm, lambda: fm.model(x).logits)
    assert (fast - ref).abs().max().item() < 1e-4


def test_skipped_tokens_do_no_query_attention_or_mlp_work():
    """Count the rows that reach q_proj, o_proj, the MLP and the adapter: skipped tokens reach only K/V."""
    fm = mixed_model("llama")
    layer = fm.layers[1]
    attn, seen = layer.base_layer.self_attn, {}
    for name, mod in [("q", attn.q_proj), ("k", attn.k_proj), ("o", attn.o_proj), ("mlp", layer.base_layer.mlp),
                      ("adapter", layer.adapter)]:
        mod.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, a[0].shape[:-1].numel()))
    x = ids(batch=1, n=16)
    with torch.no_grad(), fm.record() as rec:
        fm.model(x)
    n_run = int(rec.decisions()[0, :, 1].sum())
    assert 0 < n_run < 16
    assert seen == {"k": 16, "q": n_run, "o": n_run, "mlp": n_run, "adapter": 16 - n_run}


def count_rows(fm, layer_index=1):
    """Rows reaching each projection of one routed layer in the next forward (forward hooks)."""
    layer = fm.layers[layer_index]
    attn, mlp, seen = layer.base_layer.self_attn, layer.base_layer.mlp, {}
    mods = [("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj), ("gate", mlp.gate_proj),
            ("up", mlp.up_proj), ("down", mlp.down_proj), ("adapter", layer.adapter)]
    for name, mod in mods:
        mod.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, seen.get(name, 0) + a[0].shape[:-1].numel()))
    return seen


@pytest.mark.parametrize("unit", ["module", "mlp"])
def test_skipped_modules_do_no_work(unit):
    """module: a token skipping attention reaches k/v only (no q, attention, o_proj); one skipping the MLP reaches
    only the adapter. mlp: attention for every token, MLP rows only for the running ones."""
    fm = mixed_model("llama", skip_unit=unit)
    seen = count_rows(fm)
    x = ids(batch=2, n=16)
    with torch.no_grad(), fm.record() as rec:
        fm.model(x)
    d = rec.decisions()
    attn = d[..., 2] if unit == "module" else torch.ones(2, 16, dtype=torch.bool)  # layer 1: columns 2, 3 (module)
    mlp_run = int(d[..., 3 if unit == "module" else 1].sum())  # or 1 (mlp)
    assert 0 < mlp_run < 32 and (unit == "mlp" or 0 < attn.sum() < 32), "the test needs mixed decisions"
    assert unit == "mlp" or (d[..., 2] != d[..., 3]).any(), "the test needs tokens whose two units differ"
    assert unit == "mlp" or attn.sum(-1).unique().numel() == 2, "the test needs rows with unequal counts"
    # queries and o_proj: the running tokens, each row padded to the row with the most (fastpath.running_index)
    q_rows = 2 * int(attn.sum(-1).max())
    assert seen == {"k": 32, "v": 32, "q": q_rows, "o": q_rows, "gate": mlp_run, "up": mlp_run,
                    "down": mlp_run, "adapter": 32 - mlp_run}
    seen.clear()
    with torch.no_grad(), fm.record() as rec:  # one row: exactly the running tokens
        fm.model(x[:1])
    d = rec.decisions()[0]
    attn_run = int(d[:, 2].sum()) if unit == "module" else 16
    mlp_run = int(d[:, 3 if unit == "module" else 1].sum())
    assert seen == {"k": 16, "v": 16, "q": attn_run, "o": attn_run, "gate": mlp_run, "up": mlp_run,
                    "down": mlp_run, "adapter": 16 - mlp_run}


def test_training_keeps_the_reference_path():
    """With gradients on, both branches run for every token (the router's straight-through gradient)."""
    fm = mixed_model("llama")
    calls = []
    fm.layers[1].base_layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[1]))
    fm.model(ids(batch=1, n=16)).logits.sum().backward()
    assert calls == [16]
    assert fm.layers[1].router.head.weight.grad is not None


def test_deep_copy_gets_its_own_plan():
    fm = mixed_model("llama")
    x = ids()
    with torch.no_grad():
        fm.model(x)  # builds the plans
        twin = copy.deepcopy(fm.model)
        for layer in twin.model.layers:
            layer.base_layer.self_attn.q_proj.weight.zero_()
        assert not torch.allclose(twin(x).logits, fm.model(x).logits)


@pytest.mark.real
def test_smollm2_fast_path_equals_reference(smollm2):
    """Real weights: mixed decisions (perturbed routers), 8 fixed skipped layers, and greedy decoding."""
    model, tok, info = smollm2
    fm = FlexiModel.wrap(copy.deepcopy(model), tok, base_model=info.base_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in fm.layers:
            layer.router.head.weight.copy_(torch.randn(layer.router.head.weight.shape, generator=g) * 0.5)
            layer.router.bias.zero_()
            layer.adapter.down_proj.weight.copy_(torch.randn(layer.adapter.down_proj.weight.shape, generator=g) * 0.02)
    x = tok("The museum opens at nine and closes at five. Our train left the station twenty minutes late, "
            "so we missed the first hour.", return_tensors="pt").input_ids
    (fast, d_fast), (ref, d_ref) = both_paths(fm, lambda: fm.model(x).logits)
    assert torch.equal(d_fast, d_ref) and d_fast.any() and not d_fast.all()
    assert (fast - ref).abs().max().item() < 1e-3
    with fm.routing("fixed", skip_layers=range(22, 30)):
        (fast, _), (ref, _) = both_paths(fm, lambda: fm.model(x).logits)
    assert (fast - ref).abs().max().item() < 1e-3
    (seq_f, _), (seq_r, _) = both_paths(fm, lambda: fm.model.generate(x, max_new_tokens=4, do_sample=False))
    assert torch.equal(seq_f, seq_r)


def test_router_inference_form_equals_forward():
    from flexicli.core.routed_layer import Router

    r = Router(64)
    torch.nn.init.normal_(r.head.weight, std=0.5)
    z = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert torch.allclose(r.infer(z), r(z), atol=1e-6)
        r.head.weight.mul_(-1)  # an in-place update (an optimizer step) must refresh the folded vector
        assert torch.allclose(r.infer(z), r(z), atol=1e-6)
        r.norm.weight.uniform_(0.5, 2.0)  # and the folded norm gain
        assert torch.allclose(r.infer(z), r(z), atol=1e-6)
        for i in range(7):  # one token (a CPU decode step) takes the numpy route
            one = z[1:, i:i + 1]
            assert r.infer(one).shape == (1, 1) and torch.allclose(r.infer(one), r(one), atol=1e-6)
        r.bias.add_(3.0)
        assert torch.allclose(r.infer(z[:1, :1]), r(z[:1, :1]), atol=1e-6)
        rb, zb = copy.deepcopy(r).to(torch.bfloat16), z.to(torch.bfloat16)  # other dtypes: float32 norm, as forward
        assert torch.allclose(rb.infer(zb), rb(zb), atol=2e-2)
