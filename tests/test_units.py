"""Skip units (flexicli/core/units.py): the module/mlp forward by hand, what a unit costs, configs and the CLI."""

import copy
import json

import pytest
import torch

from conftest import tiny_model
from flexicli.core.errors import BadInput, CheckpointError
from flexicli.core.flexi_model import FlexiModel


def wrap(family="llama", **kw):
    return FlexiModel.wrap(tiny_model(family), routed_layers=[0, 1], base_model="tiny", **kw)


def layer_io(fm, index=1):
    layer, seen = fm.layers[index], {}
    layer.register_forward_hook(lambda m, a, out: seen.update(out=out))
    layer.register_forward_pre_hook(lambda m, a, kw: seen.update(inp=a[0] if a else kw["hidden_states"]),
                                    with_kwargs=True)
    return layer, seen


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("skip", ["attn", "mlp", "both"])
def test_module_unit_by_hand(skip, fast):
    """A token skipping attention adds nothing from it; a token skipping the MLP takes the adapter."""
    fm = wrap(skip_unit="module")
    fm.state.fast_path = fast
    layer, seen = layer_io(fm)
    torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
    base = layer.base_layer
    with torch.no_grad():
        if skip in ("attn", "both"):
            layer.attn_router.bias.fill_(-20.0)
        if skip in ("mlp", "both"):
            layer.mlp_router.bias.fill_(-20.0)
        x = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
        with fm.record() as rec:
            fm.model(x)
        h = seen["inp"]
        if skip == "mlp":
            pos = fm.model.model.rotary_emb(h, torch.arange(6)[None])
            h = h + base.self_attn(base.input_layernorm(h), position_embeddings=pos, attention_mask=None)[0]
        n = base.post_attention_layernorm(h)
        expect = h + (base.mlp(n) if skip == "attn" else layer.adapter(n))
    assert (seen["out"] - expect).abs().max() <= 1e-5
    d = rec.decisions()[0, :, 2:]  # layer 1: (attn, mlp)
    assert d[:, 0].all() == (skip == "mlp") and d[:, 1].all() == (skip == "attn")


def test_mlp_unit_has_no_attention_router_and_records_its_units():
    fm = wrap(skip_unit="mlp", router="linear")
    assert fm.unit_keys == [(0, "mlp"), (1, "mlp")] and fm.unit_labels == ["0.mlp", "1.mlp"]
    assert not hasattr(fm.layers[0], "router") and not hasattr(fm.layers[0], "attn_router")
    assert sorted(fm.flexi_state_dict()) == sorted(
        f"layers.{i}.{k}" for i in (0, 1) for k in ("mlp_router.proj.weight", "mlp_router.proj.bias",
                                                    "adapter.gate_proj.weight", "adapter.up_proj.weight",
                                                    "adapter.down_proj.weight"))


def test_unit_costs_are_the_parameters_a_token_no_longer_reads():
    """tiny llama: q, o 64x64 each; k, v 64x32 (read either way); MLP 3 x 64x128."""
    fm = wrap(skip_unit="module")
    a, m = 2 * 64 * 64, 3 * 64 * 128
    assert fm.unit_costs == pytest.approx([a / (a + m), m / (a + m)] * 2)
    assert fm.capacity == pytest.approx(2.0)
    assert wrap(skip_unit="mlp").capacity == pytest.approx(2 * m / (a + m))
    assert wrap().unit_costs == [1.0, 1.0] and wrap().unit_keys == [0, 1]
    with torch.no_grad(), fm.routing("fixed", skip_layers={1}), fm.record() as rec:  # layer 1: both units skip
        fm.model(torch.randint(3, 128, (2, 5)))
    assert torch.allclose(rec.skipped_layers(), torch.ones(2, 5))
    assert fm.layer_equivalents([10, 10, 0, 0]) == pytest.approx(10.0)


@pytest.mark.parametrize("unit,router", [("module", "linear"), ("mlp", "flexidepth"), ("layer", "linear")])
def test_save_load_round_trip(tmp_path, tiny_folder, unit, router):
    from flexicli.convert import convert

    fm = convert(str(tiny_folder), tmp_path / "ck", skip_unit=unit, router=router)
    with torch.no_grad():
        for p in fm.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape))
    fm.save(tmp_path / "ck", overwrite=True)
    back = FlexiModel.load(tmp_path / "ck")
    assert (back.config.skip_unit, back.config.router) == (unit, router)
    want, got = fm.flexi_state_dict(), back.flexi_state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_old_config_without_the_keys_loads_as_layer(tmp_path, tiny_folder):
    from flexicli.convert import convert

    convert(str(tiny_folder), tmp_path / "ck")
    path = tmp_path / "ck" / "flexi_config.json"
    data = json.loads(path.read_text())
    assert data["skip_unit"] == "layer" and data["router"] == "flexidepth"
    del data["skip_unit"], data["router"]
    path.write_text(json.dumps(data))
    fm = FlexiModel.load(tmp_path / "ck")
    assert fm.config.skip_unit == "layer" and hasattr(fm.layers[0], "router")


@pytest.mark.parametrize("key,value", [("skip_unit", "block"), ("router", "gumbel"), ("skip_unit", ["layer"])])
def test_config_with_a_unit_this_code_cannot_run(tmp_path, tiny_folder, key, value):
    from flexicli.convert import convert

    convert(str(tiny_folder), tmp_path / "ck")
    path = tmp_path / "ck" / "flexi_config.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"unknown {key.replace('skip_unit', 'skip unit')}"):
        FlexiModel.load(tmp_path / "ck")


def test_wrap_rejects_unknown_choices():
    with pytest.raises(BadInput, match="unknown skip unit 'block'.*layer, module, mlp"):
        wrap(skip_unit="block")
    with pytest.raises(BadInput, match="unknown router 'gumbel'"):
        wrap(router="gumbel")


@pytest.mark.parametrize("flag,value", [("--skip-unit", "block"), ("--router", "gumbel")])
def test_cli_unknown_choice_is_one_line_exit_2(tiny_folder, tmp_path, flag, value):
    from test_cli_convert import flexi, one_error_line

    line = one_error_line(flexi("convert", str(tiny_folder), "-o", str(tmp_path / "out"), flag, value))
    assert value in line and not (tmp_path / "out").exists()


def test_cli_convert_module(tiny_folder, tmp_path):
    from test_cli_convert import flexi

    r = flexi("convert", str(tiny_folder), "-o", str(tmp_path / "out"), "--skip-unit", "mlp", "--router", "linear",
              "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["skip_unit"] == "mlp" and info["router"] == "linear" and 0 < info["skip_capacity"] < 1


def test_fingerprint_ignores_the_new_routers():
    from flexicli.core.checkpoint import fingerprint

    original = tiny_model("gpt2")
    fm = FlexiModel.wrap(copy.deepcopy(original), routed_layers=[1], base_model="tiny", skip_unit="module")
    assert fingerprint(fm.model) == fingerprint(original)


@pytest.mark.parametrize("unit", ["module", "mlp"])
def test_generate_counts_layer_equivalents_and_names_the_units(unit):
    """Each generated token carries the units it skipped (as a full forward records them) and its layer count in
    layer-equivalents; the JSON has the per-unit decisions."""
    from flexicli.generation.decode import LayerModel, Sampling, generate, layer_range
    from tiny_text import NUM_LAYERS, ROUTED, tiny_talking_model

    fm = FlexiModel.wrap(tiny_talking_model(), routed_layers=ROUTED, base_model="tiny", skip_unit=unit)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in fm.layers:
            for r in layer.routers.values():
                r.head.weight.copy_(torch.randn(r.head.weight.shape, generator=g) * 40.0)
                r.bias.zero_()
    lm = LayerModel.from_flexi(fm, "tiny")
    prompt = [5, 9, 17, 33]
    out = generate(lm, prompt, 12, Sampling(temperature=1.0, seed=3), decode=lambda ids: "".join(map(str, ids)),
                   stop_ids=[])
    with torch.no_grad(), fm.record() as rec:
        fm.model(torch.tensor([prompt + [t.token_id for t in out.tokens]]))
    dec = rec.decisions()[0, len(prompt):]
    cost = dict(zip(fm.unit_labels, fm.unit_costs))
    for tok, row in zip(out.tokens, dec, strict=True):
        want = [label for label, ran in zip(fm.unit_labels, row.tolist()) if not ran]
        assert tok.skipped_units == want
        assert tok.layers_used == pytest.approx(NUM_LAYERS - sum(cost[u] for u in want), abs=1e-4)
        assert tok.to_dict()["skipped_units"] == want
    assert len({tuple(t.skipped_units) for t in out.tokens}) >= 2, "the planted routers should vary by token"
    assert layer_range(lm) == (pytest.approx(NUM_LAYERS - fm.capacity), NUM_LAYERS)


def test_card_shows_per_unit_rates_in_forward_order():
    from dataclasses import replace

    from flexicli.core.card import render_card

    fm = wrap(skip_unit="module")
    rates = {"1.mlp": 0.5, "0.attn": 0.25, "0.mlp": 0.0, "1.attn": 1.0}
    card = render_card(replace(fm.config, eval={"passed": True, "per_layer_skip_rate": rates,
                                                "mean_skipped_layers": 1.1, "skip_capacity": 2.0}))
    rows = [line.split(" | ")[0] for line in card.splitlines() if line.startswith(("| 0.", "| 1."))]
    assert rows == ["| 0.attn", "| 0.mlp", "| 1.attn", "| 1.mlp"]
    assert "| 0.attn | 75% |" in card and "| 1.attn | 0% |" in card and "| 1.mlp | 50% |" in card
    assert "Mean skipped per token: 1.10 of 2 layer-equivalents" in card and "skip unit `module`" in card
    no_mean = render_card(replace(fm.config, training={"per_layer_skip_rate": rates}))
    assert "| 0.mlp | 100% |" in no_mean and "Mean skipped" not in no_mean  # never guessed from the rates


def test_patterns_show_per_unit_usage(tmp_path):
    import json

    from flexicli.generation.decode import LayerModel
    from flexicli.generation.patterns import Prompt, analyse, collect, unit_args, write_outputs

    fm = wrap(skip_unit="module")
    with torch.no_grad():
        fm.layers[1].mlp_router.bias.fill_(-20.0)  # every token skips layer 1's MLP, runs the rest
    lm = LayerModel.from_flexi(fm, "tiny")
    prompts = [Prompt("p0", "custom", "x")]
    records = collect(lm, prompts, max_new_tokens=3, encode=lambda text: [5, 6, 7], decode=lambda ids: "a" * len(ids))
    analysis = analyse(records, lm.num_layers, lm.routed_layers, **unit_args(lm))
    mlp_cost = fm.layers[1].costs["mlp"]
    assert analysis.units == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert analysis.unit_usage == {"0.attn": 1.0, "0.mlp": 1.0, "1.attn": 1.0, "1.mlp": 0.0}
    assert analysis.layer_usage[:2] == pytest.approx([1.0, 1.0 - mlp_cost])
    assert all(r.skipped_units == ["1.mlp"] and r.decisions == [1, 1, 1, 0] for r in records)
    assert analysis.mean_layers_used == pytest.approx(lm.num_layers - mlp_cost, abs=1e-4)
    out, _ = write_outputs(tmp_path / "out", records, analysis, {}, prompts)
    assert "Per-unit usage" in (out / "report.html").read_text()
    assert json.loads((out / "tokens.jsonl").read_text().splitlines()[0])["skipped_units"] == ["1.mlp"]
    assert json.loads((out / "summary.json").read_text())["unit_usage"]["1.mlp"] == 0.0
