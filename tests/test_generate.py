"""flexi generate: each token carries the decisions the model recorded when it processed that token, and the
colours, the bracketed counts and the JSON all say the same thing."""

import copy
import json
import re

import pytest
import torch
from click.testing import CliRunner

from flexicli.cli import main
from flexicli.generation.decode import (Detokenizer, LayerModel, Sampling, depth_colour, generate,
                                        generation_divergence, open_model)
from flexicli.core.flexi_model import FlexiModel
from tiny_text import NUM_LAYERS, ROUTED, plant_routers, tiny_checkpoint, tiny_talking_model

PROMPT = "w1 w2 w3 w4"


def as_text(ids):
    return "".join(f" t{i}" for i in ids)


def recorded_skips(fm, ids):
    """Independent of the decode loop: one forward over the whole sequence, decisions per position."""
    with torch.no_grad(), fm.record() as rec:
        fm.model(torch.tensor([ids]))
    dec = rec.decisions()[0]  # [T, n_routed]
    return [[layer for layer, ran in zip(fm.config.routed_layers, row.tolist()) if not ran] for row in dec]


def tiny_lm(planted=True, seed=0):
    fm = FlexiModel.wrap(tiny_talking_model(seed), routed_layers=ROUTED, base_model="tiny")
    if planted:
        plant_routers(fm, seed)
    return LayerModel.from_flexi(fm, "tiny")


# ---- library -----------------------------------------------------------------------------------------------
def test_fresh_checkpoint_generates_what_the_original_generates():
    original = tiny_talking_model()
    lm = tiny_lm(planted=False)
    prompt = [5, 9, 17, 33]
    ref = original.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 4:]
    for orig in (False, True):
        g = generate(lm, prompt, 10, decode=as_text, stop_ids=[], original=orig)
        assert [t.token_id for t in g.tokens] == ref.tolist()
        assert all(t.layers_used == NUM_LAYERS and t.skipped_layers == [] for t in g.tokens)


def test_each_token_carries_the_decisions_recorded_when_it_was_processed():
    lm = tiny_lm()
    prompt = [5, 9, 17, 33]
    g = generate(lm, prompt, 16, Sampling(temperature=1.0, seed=3), decode=as_text, stop_ids=[])
    assert len(g.tokens) == 16
    per_position = recorded_skips(lm.flexi, prompt + [t.token_id for t in g.tokens])
    for k, tok in enumerate(g.tokens):
        assert tok.skipped_layers == per_position[len(prompt) + k], k  # its own step, not the one that made it
        assert tok.layers_used == NUM_LAYERS - len(tok.skipped_layers)
    assert len({tuple(t.skipped_layers) for t in g.tokens}) >= 2, "planted routers should vary by token"
    assert g.mean_layers_used == pytest.approx(sum(t.layers_used for t in g.tokens) / 16)
    assert g.text == "".join(as_text([t.token_id]) for t in g.tokens)


def test_fixed_routing_and_threshold_reach_the_tokens():
    lm = tiny_lm()
    with lm.flexi.routing("fixed", skip_layers={3}):
        g = generate(lm, [5, 9], 5, decode=as_text, stop_ids=[])
    assert all(t.skipped_layers == [3] and t.layers_used == NUM_LAYERS - 1 for t in g.tokens)
    for tau, skipped in ((0.0, []), (1.0, ROUTED)):
        assert all(t.skipped_layers == skipped for t in generate(lm, [5, 9], 5, threshold=tau, decode=as_text,
                                                                 stop_ids=[]).tokens)
    assert lm.flexi.state.threshold == 0.5  # restored


def test_stops_at_eos_without_showing_it():
    lm = tiny_lm(planted=False)
    free = generate(lm, [5, 9], 6, decode=as_text, stop_ids=[])
    stop = free.tokens[3].token_id
    g = generate(lm, [5, 9], 6, decode=as_text, stop_ids=[stop])
    first = next(i for i, t in enumerate(free.tokens) if t.token_id == stop)
    assert [t.token_id for t in g.tokens] == [t.token_id for t in free.tokens[:first]] and g.stopped == "eos"


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    lm = tiny_lm()
    run = lambda s: [t.token_id for t in generate(lm, [5, 9], 8, s, decode=as_text, stop_ids=[]).tokens]  # noqa: E731
    assert run(Sampling(1.0, seed=7)) == run(Sampling(1.0, seed=7))
    assert run(Sampling(1.0, seed=7)) != run(Sampling(1.0, seed=8))
    assert run(Sampling(1.0, top_p=1e-6, seed=7)) == run(Sampling())


def test_detokenizer_holds_half_a_character_back():
    table = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b" ok"}
    d = Detokenizer(lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace"))
    assert [d.push(i) for i in (1, 2, 3, 4)] == ["caf", "", "\u00e9", " ok"]


def test_depth_colour_ends_and_divergence():
    assert depth_colour(15, 15, 30) == "#3b82f6" and depth_colour(30, 15, 30) == "#ef4444"
    assert depth_colour(20, 20, 20) == "#ef4444"  # no routed layers: every token uses every layer
    lm = tiny_lm()
    a = generate(lm, [5, 9], 6, Sampling(1.0, seed=1), decode=as_text, stop_ids=[])
    b = generate(lm, [5, 9], 6, Sampling(1.0, seed=2), decode=as_text, stop_ids=[])
    k = generation_divergence(a, b)
    assert k is not None and a.tokens[:k] == b.tokens[:k] and a.tokens[k].token_id != b.tokens[k].token_id
    assert generation_divergence(a, a) is None


# ---- the command line on a tiny checkpoint with a tokenizer --------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gen"))


def flexi(*args, env=None, input=None):
    return CliRunner().invoke(main, list(args), env=env, input=input, catch_exceptions=False)


def expected(ckpt, token_ids, threshold=None):
    lm = open_model(str(ckpt))
    prompt = lm.encode(PROMPT)
    with lm.flexi.routing(threshold=threshold):
        per_position = recorded_skips(lm.flexi, prompt + token_ids)
    return [per_position[len(prompt) + k] for k in range(len(token_ids))]


SAMPLE = ["--temperature", "1", "--seed", "5", "--max-new-tokens", "12"]


def test_json_agrees_with_recorded_decisions(ckpt):
    r = flexi("generate", "-m", str(ckpt), PROMPT, *SAMPLE, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    toks = out["tokens"]
    assert toks and {"text", "layers_used", "skipped_layers"} <= set(toks[0])
    assert [t["skipped_layers"] for t in toks] == expected(ckpt, [t["token_id"] for t in toks])
    assert all(t["layers_used"] == NUM_LAYERS - len(t["skipped_layers"]) for t in toks)
    assert out["mean_layers_used"] == pytest.approx(sum(t["layers_used"] for t in toks) / len(toks))
    assert out["text"] == "".join(t["text"] for t in toks)
    assert len({tuple(t["skipped_layers"]) for t in toks}) >= 2


def test_colours_agree_with_recorded_decisions(ckpt):
    r = flexi("generate", "-m", str(ckpt), PROMPT, *SAMPLE, "--show-layers",
              env={"FORCE_COLOR": "1", "COLORTERM": "truecolor", "NO_COLOR": None})
    assert r.exit_code == 0, r.output
    stream, _, tail = r.stdout.partition("layers used:")
    shown = re.findall(r"\x1b\[38;2;(\d+);(\d+);(\d+)m([^\x1b]*)\x1b\[0m", stream)
    js = json.loads(flexi("generate", "-m", str(ckpt), PROMPT, *SAMPLE, "--json").stdout)["tokens"]
    skips = expected(ckpt, [t["token_id"] for t in js])
    visible = [(t["text"], NUM_LAYERS - len(s)) for t, s in zip(js, skips) if t["text"]]
    assert len(shown) == len(visible) > 3
    for (r_, g_, b_, text), (want_text, layers) in zip(shown, visible):
        assert text == want_text
        assert f"#{int(r_):02x}{int(g_):02x}{int(b_):02x}" == depth_colour(layers, NUM_LAYERS - len(ROUTED), NUM_LAYERS)
    mean = sum(NUM_LAYERS - len(s) for s in skips) / len(skips)
    assert f"mean layers used {mean:.2f} of {NUM_LAYERS}" in tail


def test_without_colour_each_token_carries_its_count(ckpt):
    r = flexi("generate", "-m", str(ckpt), PROMPT, *SAMPLE, "--show-layers", env={"NO_COLOR": "1"})
    js = json.loads(flexi("generate", "-m", str(ckpt), PROMPT, *SAMPLE, "--json").stdout)["tokens"]
    assert r.stdout.splitlines()[0] == "".join(f"{t['text']}[{t['layers_used']}]" for t in js)
    assert "% of layer computations skipped" in r.stdout


def test_compare_marks_the_first_divergence(ckpt):
    r = flexi("generate", "-m", str(ckpt), PROMPT, "--max-new-tokens", "8", "--compare", "--json")
    out = json.loads(r.stdout)
    assert all(t["layers_used"] == NUM_LAYERS for t in out["original"]["tokens"])
    ids = lambda g: [t["token_id"] for t in g["tokens"]]  # noqa: E731
    k = out["first_divergence"]
    assert (k is None) == (ids(out) == ids(out["original"]))
    if k is not None:
        assert ids(out)[:k] == ids(out["original"])[:k] and ids(out)[k] != ids(out["original"])[k]
    text = flexi("generate", "-m", str(ckpt), PROMPT, "--max-new-tokens", "8", "--compare",
                 env={"NO_COLOR": "1"}).stdout
    assert "original (every layer):" in text
    assert (f"first divergence at generated token {k}" in text) if k is not None else ("identical" in text)


def test_base_model_without_checkpoint_uses_every_layer(ckpt):
    base = ckpt.parent / "tiny-base"
    for args in (["-m", str(base)], ["--base", str(base)]):
        r = flexi("generate", *args, PROMPT, "--max-new-tokens", "4", "--json")
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["mean_layers_used"] == NUM_LAYERS and all(t["skipped_layers"] == [] for t in out["tokens"])
        assert "not a flexicli checkpoint" in r.stderr


def test_chat_keeps_history(ckpt, monkeypatch):
    seen = []
    real = LayerModel.encode_chat
    monkeypatch.setattr(LayerModel, "encode_chat", lambda self, m: seen.append(copy.deepcopy(m)) or real(self, m))
    r = flexi("generate", "-m", str(ckpt), "--max-new-tokens", "3", input="w1 w2\n\nw3\n/exit\n")
    assert r.exit_code == 0, r.output
    assert [[m["role"] for m in msgs] for msgs in seen] == [["user"], ["user", "assistant", "user"]]
    assert seen[1][1]["content"] and seen[1][1]["content"] in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--threshold", "1.5", "x"], "--threshold must be in [0, 1]"),
    (["--max-new-tokens", "0", "x"], "--max-new-tokens"),
    (["--temperature", "-1", "x"], "--temperature"),
    (["--json"], "--json needs a PROMPT"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, args, needle):
    r = flexi("generate", "-m", str(ckpt), *args)
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_checkpoint_and_compare_without_one(tmp_path, ckpt):
    r = flexi("generate", "-m", str(tmp_path / "nope"), "x")
    assert r.exit_code == 2 and "no checkpoint folder" in r.stderr
    r = flexi("generate", "--base", str(ckpt.parent / "tiny-base"), "x", "--compare")
    assert r.exit_code == 2 and "--compare needs a flexicli checkpoint" in r.stderr


# ---- the real SmolLM2 -----------------------------------------------------------------------------------------
@pytest.mark.real
def test_real_smollm2_decode_loop_and_recorded_decisions(smollm2):
    model, tok, _ = smollm2
    fm = FlexiModel.wrap(copy.deepcopy(model), tok, base_model="smollm2")
    lm = LayerModel.from_flexi(fm, "smollm2")
    prompt = lm.encode("What is the capital of France?")
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    fresh = generate(lm, prompt, 8)
    assert [t.token_id for t in fresh.tokens] == [i for i in ref if i not in lm.stop_ids()][:len(fresh.tokens)]
    assert fresh.mean_layers_used == 30
    # A fresh router's gates scatter narrowly around sigmoid(init bias): that threshold makes tokens skip, differently
    # per token.
    tau = torch.sigmoid(torch.tensor(fm.config.router_init_bias)).item()
    g = generate(lm, prompt, 8, threshold=tau)
    with fm.routing(threshold=tau):
        skips = recorded_skips(fm, prompt + [t.token_id for t in g.tokens])
    assert [t.skipped_layers for t in g.tokens] == skips[len(prompt):]
    used = [t.layers_used for t in g.tokens]
    assert 30 - len(fm.layers) <= min(used) < 30 and len(set(used)) >= 2
