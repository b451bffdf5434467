"""Training on tiny models: the loss falls, only routers/adapters change, resume equals an unbroken run."""

import copy
import math
import json

import pytest
import torch

from conftest import tiny_model
from flexicli.train.budget import BudgetPenalty
from flexicli.train.objectives import gate_margin
from flexicli.core.flexi_model import ADAPTER_REDUCTION, FlexiModel
from flexicli.core.routed_layer import threshold_logit, threshold_of
from flexicli.train.config import TrainConfig, load_recipe, recipes_dir
from flexicli.train.loop import batch_indices, train


def peaky_tiny(family="llama", sharpen=30.0):
    """A tiny random model with a sharpened output head: random models predict near-uniform distributions, which
    makes every KL tiny; a sharp head gives the distillation something to preserve."""
    model = tiny_model(family)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model


def tiny_routed(family="llama", **wrap):
    """Layers 0 and 1 routed, adapters / 8 (flexi convert's default until 2026-12-06): the step counts and thresholds
    of the tests below (and test_train_units') were set on this peaky tiny model at that width, and adapter width is
    not what they test (at / 4 its penalty moves the count more slowly). `wrap`: more FlexiModel.wrap settings."""
    return FlexiModel.wrap(peaky_tiny(family), routed_layers=[0, 1], base_model="tiny", adapter_reduction=8, **wrap)


def setup(tmp_path=None, family="llama"):
    fm = tiny_routed(family)
    g = torch.Generator().manual_seed(0)
    rows, heldout = torch.randint(3, 128, (16, 32), generator=g), torch.randint(3, 128, (4, 32), generator=g)
    if tmp_path is not None:
        fm.save(tmp_path / "ckpt")
        fm.path = tmp_path / "ckpt"
    return fm, rows, heldout


def tiny_at(folder, resume=False):
    """The tiny routed model with its checkpoint in `folder`: saved there fresh, or (resume) loaded from it, as in a
    new process that resumes a killed run."""
    from flexicli.core.checkpoint import read_weights

    fm = tiny_routed()
    if resume:
        fm.load_flexi_state_dict(read_weights(folder))
    else:
        fm.save(folder)
    fm.path = folder
    return fm


def cfg(**kw):
    """Tiny-model settings: the mechanisms alone. top1_weight off: with fresh routers on a tiny random model the
    term pulls tokens back into the layers faster than 12-80 steps of the budget push them out (measured: a target
    of 1 reached 0.22 skipped in 40 steps with it, > 0.3 without); the real model's runs hit the budget with it."""
    base = dict(skip_target=1.0, steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=100,
                save_every=100, calibrate=False, budget="penalty", router_init="none", adapter_init="none",
                top1_weight=0.0)
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_only_router_adapter_change():
    fm, rows, heldout = setup()
    base_before = {k: v.clone() for k, v in fm.model.state_dict().items() if ".router." not in k and ".adapter." not in k}
    flexi_before = {k: v.clone() for k, v in fm.flexi_state_dict().items()}
    losses = []
    fm.path = None
    summary = train(fm, cfg(steps=40), rows=rows, heldout=heldout, progress=False, log=losses.append)
    for k, v in fm.model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    changed = [k for k, v in fm.flexi_state_dict().items() if not torch.equal(v, flexi_before[k])]
    assert changed, "training must change routers/adapters"
    assert summary["mean_skipped_layers"] > 0.3, summary


def test_distillation_loss_falls_at_fixed_skipping():
    """Layer 1 is forced to skip (its router saturated); training the adapter must bring the KL on the training
    rows down. (Held-out rows of random tokens share nothing with the training rows, so they cannot improve.)"""
    fm, rows, _ = setup()
    from flexicli.train.loop import heldout_metrics

    fm.layers[0].router.bias.data.fill_(20.0)
    fm.layers[1].router.bias.data.fill_(-20.0)
    before = heldout_metrics(fm, rows)["kl"]
    train(fm, cfg(steps=25, ramp=0.0), rows=rows, heldout=None, progress=False, log=lambda m: None)
    after = heldout_metrics(fm, rows)
    assert after["per_layer_skip_rate"] == {"0": 0.0, "1": 1.0}
    assert after["kl"] < 0.7 * before, (before, after["kl"])


@pytest.mark.parametrize("budget,router_init", [("penalty", "none"), ("threshold", "influence"),
                                                ("capacity", "none")])
def test_budget_is_hit(budget, router_init):
    fm, rows, heldout = setup()
    summary = train(fm, cfg(steps=80, skip_target=1.0, budget=budget, router_init=router_init, calibrate=True),
                    rows=rows, heldout=heldout, progress=False, log=lambda m: None)
    # As a user runs it: training moves the count most of the way (the penalty's integral is clamped, so on this
    # peaky tiny model it settles short of the target: 0.56 after 80 steps with the default adapters / 8, 0.36 after
    # 60; / 16 reached 0.57 in 60), calibration on held-out rows lands it. The count training reached is the last
    # step's weights' (the saved average's routers lag them a little).
    assert summary["last_step"]["mean_skipped_layers"] >= 0.4, summary
    assert abs(summary["mean_skipped_layers"] - 1.0) <= 0.5, summary


def test_capacity_skips_exactly_the_share_at_every_step(tmp_path):
    """Budget "capacity": from the first observed step on, the training count equals the (ramped) target exactly."""
    import json

    fm, rows, heldout = setup(tmp_path)
    train(fm, cfg(steps=20, skip_target=1.0, budget="capacity", ramp=0.5), rows=rows, heldout=None,
          progress=False, log=lambda m: None)
    steps = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 20
    assert steps[0]["mean_skipped_layers"] < 0.05  # fresh routers: the threshold decides before any observation
    tokens = 4 * 32
    for rec in steps[1:]:
        # per layer round(share * tokens) tokens skip, so the count is the target to within rounding
        assert rec["mean_skipped_layers"] == pytest.approx(rec["target"], abs=2 / tokens + 1e-6), rec
        # each unit's logged skip rate: they add up to the count (every unit costs one layer here)
        assert list(rec["unit_skip_rate"]) == fm.unit_labels
        assert sum(rec["unit_skip_rate"].values()) == pytest.approx(rec["mean_skipped_layers"], abs=2e-3), rec


def test_capacity_decisions_pick_the_lowest_gates_and_break_ties():
    from flexicli.core.routed_layer import capacity_decisions

    w = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    run, centre = capacity_decisions(w, 0.5)
    assert run.tolist() == [[True, False, True, False]] and 0.3 < centre < 0.5
    assert capacity_decisions(w, 0.0)[0].all() and not capacity_decisions(w, 1.0)[0].any()
    tied = torch.ones(2, 3)  # saturated gates: still exactly round(share * tokens) skip
    assert int((~capacity_decisions(tied, 0.5)[0]).sum()) == 3


def test_capacity_recomputes_the_same_decisions_under_gradient_checkpointing():
    """Checkpointed layers are recomputed in backward: they must take the step's capacity decisions again (the
    capacities stay set until backward is done), so the run equals one without checkpointing."""
    out = []
    for ckpt in (True, False):
        fm, rows, _ = setup()
        train(fm, cfg(steps=6, budget="capacity", ramp=0.0, gradient_checkpointing=ckpt), rows=rows, heldout=None,
              progress=False, log=lambda m: None)
        out.append(fm.flexi_state_dict())
    for k, v in out[0].items():
        assert torch.allclose(v, out[1][k], atol=1e-5), k


def test_gate_margin_pushes_gates_off_the_threshold():
    x = torch.tensor([-0.5, 0.2, 3.0], requires_grad=True)  # router logits of one token in three layers
    gates = [(i, torch.sigmoid(x[i]).reshape(1, 1), (x[i] > 0).reshape(1, 1)) for i in range(3)]  # threshold 0.5
    margin = gate_margin(gates, center=0.0, width=1.0)
    assert margin.shape == (1, 1) and margin.item() == pytest.approx(0.5 + 0.8, abs=1e-4)
    margin.sum().backward()
    # descent moves the skipping gate down, the running one up, and leaves the one outside the margin alone
    assert x.grad[0] > 0.99 and x.grad[1] < -0.99 and x.grad[2] == 0
    shifted = gate_margin(gates, center=0.2, width=1.0)  # the threshold itself, in logit space, is the centre
    assert shifted.item() == pytest.approx(0.3 + 1.0, abs=1e-4)
    # decisions by rank (budget capacity): a token that skips while its logit is above the centre is pushed below it
    ranked = [(i, g[1], torch.tensor([[i == 2]])) for i, g in enumerate(gates)]  # layer 1 skips at logit 0.2
    assert gate_margin(ranked, center=0.0).item() == pytest.approx(0.5 + 1.2, abs=1e-4)


def test_row_spread_moves_skips_between_rows_and_leaves_the_mean(tmp_path):
    """The term is the variance of the rows' counts: zero when every row skips alike, and its gradient pushes a row
    that skips more than the batch toward running and one that skips less toward skipping, summing to zero; a run
    with it logs the rows' spread; a negative weight is refused."""
    from flexicli.core.errors import BadInput
    from flexicli.train.objectives import row_spread

    assert row_spread(torch.full((3, 5), 2.0)).item() == 0.0
    counts = torch.tensor([[3.0, 3.0], [1.0, 1.0]], requires_grad=True)  # row 0 skips 3 layers a token, row 1 skips 1
    spread = row_spread(counts)
    assert spread.item() == pytest.approx(1.0)
    spread.backward()
    assert (counts.grad[0] > 0).all() and (counts.grad[1] < 0).all()  # descent: row 0 skips less, row 1 more
    assert counts.grad.sum().item() == pytest.approx(0.0, abs=1e-7)  # the batch's mean count is the budget's
    with pytest.raises(BadInput, match="row_spread"):
        cfg(row_spread=-1.0).check()
    with pytest.raises(BadInput, match="objective kl"):
        cfg(row_spread=1.0, objective="lm").check()
    fm, rows, _ = setup(tmp_path)
    for layer in fm.layers:  # routers that skip some tokens, so rows can differ
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
    train(fm, cfg(steps=2, row_spread=1.0), rows=rows, heldout=None, progress=False, log=lambda m: None)
    steps = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and any(r["row_skip_std"] > 0 for r in steps)


def test_data_mix_tells_each_rows_source(smollm2, monkeypatch):
    """Data mix: every conversation row has source 0 and every documentation row source 1 (source_spread's labels)."""
    from types import SimpleNamespace

    import flexicli.data.text as text
    from flexicli.train.loop import training_data

    model, tok, _ = smollm2
    monkeypatch.setattr(text, "teacher_answers", lambda fm, prompts, *a, **k: ["An answer."] * len(prompts))
    monkeypatch.setattr(text, "package_docs", lambda *a, **k: ["Plain documentation prose. " * 40] * 60)
    rows, _, source = training_data(SimpleNamespace(tokenizer=tok, model=model), cfg(data="mix", seq_len=64))
    assert source.shape == (rows.shape[0],) and set(source.tolist()) == {0, 1}
    marker = tok.convert_tokens_to_ids("<|im_start|>")  # the chat template's: in every conversation row, no doc row
    in_row = (rows == marker).any(dim=1)
    assert torch.equal(in_row, source == 0)


def test_source_spread_evens_the_kinds_of_text_and_leaves_rows_within_a_kind(tmp_path):
    """The term is the variance between the sources' mean counts: zero with one source or sources that skip alike
    on average (however the rows within a source differ); its gradient moves the source that skips more toward
    running, sums to zero (the budget keeps the mean), and gives rows of one source the same push. A run with it
    trains; a run without rows' sources, a negative weight, or data other than mix is refused."""
    from flexicli.core.errors import BadInput
    from flexicli.train.objectives import source_spread

    one = torch.tensor([0, 0, 0])
    assert source_spread(torch.tensor([[3.0], [1.0], [2.0]]), one).item() == 0.0
    alike = torch.tensor([[3.0], [1.0], [1.0], [3.0]])  # each source's rows differ, their means do not
    assert source_spread(alike, torch.tensor([0, 0, 1, 1])).item() == 0.0
    counts = torch.tensor([[3.0, 3.0], [4.0, 4.0], [1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    spread = source_spread(counts, torch.tensor([0, 0, 1, 1]))  # source 0 skips 3.5 a token, source 1 skips 0.5
    assert spread.item() == pytest.approx(1.5 ** 2)
    spread.backward()
    assert (counts.grad[:2] > 0).all() and (counts.grad[2:] < 0).all()  # descent: source 0 skips less, 1 more
    assert torch.equal(counts.grad[0], counts.grad[1]) and torch.equal(counts.grad[2], counts.grad[3])
    assert counts.grad.sum().item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(BadInput, match="source_spread"):
        cfg(source_spread=-1.0).check()
    with pytest.raises(BadInput, match="data mix"):
        cfg(source_spread=1.0, data="docs").check()
    fm, rows, _ = setup(tmp_path)
    with pytest.raises(BadInput, match="source"):
        train(fm, cfg(steps=1, source_spread=1.0), rows=rows, heldout=None, progress=False, log=lambda m: None)
    source = torch.arange(rows.shape[0]) % 2
    summary = train(fm, cfg(steps=2, source_spread=1.0), rows=rows, heldout=None, progress=False, log=lambda m: None,
                    source=source)
    assert summary["steps"] == 2
    steps = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert all("skipped_conversations" in r or "skipped_docs" in r for r in steps)  # each step's count per source


def test_source_spread_is_on_by_default_where_the_rows_carry_their_source(tmp_path):
    """Default (None): SOURCE_SPREAD under distillation with the rows' sources known (the built-in data mix, or rows
    given with theirs), off otherwise; a value set by hand is kept. Trained from the same start, the default run ends
    where the run with source_spread set to SOURCE_SPREAD by hand does, and elsewhere than the run with it off."""
    from dataclasses import replace

    from flexicli.train.config import SOURCE_SPREAD

    default = cfg()
    assert default.source_spread is None
    assert default.resolved(has_source=True).source_spread == SOURCE_SPREAD
    assert default.resolved(has_source=False).source_spread == 0.0
    assert replace(default, objective="lm").resolved(has_source=True).source_spread == 0.0
    assert cfg(source_spread=0.0).resolved(has_source=True).source_spread == 0.0
    stock = TrainConfig(skip_target=1.0)  # the stored settings say what ran: top1_weight as in effect
    assert stock.resolved(has_source=True).top1_weight == stock.top1 > 0
    assert replace(stock, objective="lm").resolved(has_source=False).top1_weight == 0.0
    assert stock.resolved(has_source=True).margin_weight == stock.margin > 0  # and the margin in effect (0.03)
    assert replace(stock, router_init="none").resolved(has_source=True).margin_weight == 0.0
    _, rows, _ = setup()
    source = torch.arange(rows.shape[0]) % 2
    ends = {}
    settings = {"default": {}, "by_hand": {"source_spread": SOURCE_SPREAD}, "off": {"source_spread": 0.0}}
    for name, setting in settings.items():
        fm, _, _ = setup(tmp_path / name)
        train(fm, cfg(steps=3, **setting), rows=rows, heldout=None, progress=False, log=lambda m: None, source=source)
        ends[name] = torch.cat([p.detach().flatten() for p in fm.trainable_parameters()])
    assert torch.equal(ends["default"], ends["by_hand"])
    assert not torch.equal(ends["default"], ends["off"])


@pytest.mark.parametrize("budget", ["penalty", "threshold", "capacity"])
def test_resume_equals_unbroken_run(tmp_path, budget):
    fm_a, rows, heldout = setup(tmp_path / "a")
    fm_b = tiny_routed()
    fm_b.save(tmp_path / "b")
    fm_b.path = tmp_path / "b"
    c = dict(steps=10, save_every=100, budget=budget)
    train(fm_a, cfg(**c), rows=rows, heldout=None, progress=False, log=lambda m: None)
    train(fm_b, cfg(**c), rows=rows, heldout=None, progress=False, log=lambda m: None, stop_after=4)  # "killed"
    fm_c = tiny_routed()  # as in a fresh process
    from flexicli.core.checkpoint import read_weights

    fm_c.load_flexi_state_dict(read_weights(tmp_path / "b"))
    fm_c.path = tmp_path / "b"
    train(fm_c, cfg(**c), rows=rows, heldout=None, progress=False, log=lambda m: None, resume=True)
    for k, v in fm_a.flexi_state_dict().items():
        assert torch.allclose(v, fm_c.flexi_state_dict()[k], atol=1e-6), k


def test_weight_average_is_saved_and_the_last_step_resumes(tmp_path):
    """ema > 0: the checkpoint holds the average of the steps' weights (the plain mean until the decay reaches
    `ema`), training itself is unchanged, and a killed run resumes to the same average."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from flexicli.train.resume import saved_weights

    def run(name, stop_after=None, resume=False, **kw):
        fm = tiny_at(tmp_path / name, resume)
        train(fm, cfg(steps=3, **kw), rows=rows, heldout=heldout, progress=False, log=lambda m: None,
              stop_after=stop_after, resume=resume)
        return {k: v.clone() for k, v in fm.flexi_state_dict().items()}

    _, rows, heldout = setup()
    w = [run(f"plain{n}", stop_after=n, ema=0.0) for n in (1, 2)] + [run("plain3", ema=0.0)]  # each step's weights
    averaged = run("ema", ema=0.6, calibrate=True)
    for k, v in averaged.items():  # decays 0, 0.5, then min(0.6, 2/3)
        expect = 0.6 * (w[0][k] + w[1][k]) / 2 + 0.4 * w[2][k]
        assert torch.allclose(v, expect, atol=1e-6), k
    assert any(not torch.equal(averaged[k], w[2][k]) for k in averaged)
    last = saved_weights(tmp_path / "ema")["last"]
    assert all(any(torch.equal(t, v) for v in w[2].values()) for t in last), "the last step's weights are kept"
    run("ema_killed", stop_after=2, ema=0.6, calibrate=True)
    resumed = run("ema_killed", resume=True, ema=0.6, calibrate=True)
    for k, v in averaged.items():
        assert torch.allclose(v, resumed[k], atol=1e-6), k
    uncalibrated = run("ema_nocal", ema=0.6)  # no calibration after training: the routers stay the last step's
    for k, v in uncalibrated.items():
        assert torch.equal(v, w[2][k]) if ".router." in k else torch.allclose(v, averaged[k], atol=1e-6), k
    # a run saved before the average existed (no "ema" in its saved settings) resumes without one
    run("old", stop_after=2, ema=0.0, calibrate=True)
    state_file = tmp_path / "old" / "train_state.safetensors"
    with safe_open(state_file, "pt") as f:
        scalars, tensors = json.loads(f.metadata()["scalars"]), {k: f.get_tensor(k) for k in f.keys()}
    del scalars["train_config"]["ema"]
    save_file(tensors, state_file, metadata={"scalars": json.dumps(scalars)})
    for k, v in run("old", resume=True, calibrate=True).items():
        assert torch.allclose(v, w[2][k], atol=1e-6), k
    with pytest.raises(Exception, match="ema must be"):
        cfg(ema=1.0).check()


def test_data_order_is_a_function_of_seed_and_index():
    assert torch.equal(batch_indices(10, 0, 3, 4), batch_indices(10, 0, 3, 4))
    assert not torch.equal(batch_indices(10, 0, 3, 4), batch_indices(10, 1, 3, 4)), "another seed, another order"
    seen = torch.cat([batch_indices(10, 0, i, 2) for i in range(5)]).tolist()
    assert sorted(seen) == list(range(10)), "one epoch visits every row once"


def test_recipes_load_and_bad_settings_fail(tmp_path):
    from flexicli.core.errors import BadInput

    r = load_recipe("smollm2-135m-cpu")
    assert TrainConfig.from_dict({**r, "skip_target": 4}).steps == r["steps"]
    with pytest.raises(BadInput, match="no recipe"):
        load_recipe("nope")
    flat = tmp_path / "flat.yaml"  # no train: section, a convert: one: the rest are the training settings
    flat.write_text("steps: 3\nconvert:\n  adapter_reduction: 16\n")
    assert load_recipe(str(flat)) == {"steps": 3} and load_recipe(str(flat), "convert") == {"adapter_reduction": 16}
    flat.write_text("- steps: 3\n")
    with pytest.raises(BadInput, match="not a mapping"):
        load_recipe(str(flat))
    with pytest.raises(BadInput, match="unknown training settings"):
        TrainConfig.from_dict({"skip_target": 1, "stepz": 3})
    with pytest.raises(BadInput, match="outside 0..2"):
        cfg(skip_target=5).check(2)


@pytest.mark.parametrize("name", sorted(p.stem for p in recipes_dir().glob("*.yaml")))
def test_every_shipped_recipe_is_a_valid_config(name):
    r = load_recipe(name)
    c = TrainConfig.from_dict({"skip_target": 4, **r})  # a recipe without skip_target gets it from the flag
    c.check()
    from click.testing import CliRunner
    from flexicli.cli.train import command
    wide = CliRunner().invoke(command, ["--help"], terminal_width=1000, max_content_width=1000).output  # no wrapping
    assert name in wide, "flexi train --help names every shipped recipe"


def test_cpu_recipe_is_the_defaults_spelled_out():
    r = load_recipe("smollm2-135m-cpu")
    default = TrainConfig(skip_target=4)
    differs = {k: (v, getattr(default, k)) for k, v in r.items()
               if k not in ("margin_weight", "top1_weight") and getattr(default, k) != v}
    assert not differs, f"the recipe says it spells out the defaults; it differs in {differs}"
    assert r["margin_weight"] == default.margin, "the margin in effect under the defaults"
    assert r["top1_weight"] == default.top1, "the top-1 term's weight in effect under the defaults"


def test_gradient_checkpointing_gives_same_gradients():
    fm, rows, _ = setup()
    fm2 = copy.deepcopy(fm)
    fm2.state.checkpointing = True
    from flexicli.train.objectives import logits_fn
    from flexicli.train.loop import train_step

    grads = []
    for m in (fm, fm2):
        for p in m.trainable_parameters():
            p.requires_grad_(True)
        train_step(m, rows[:4], cfg(), logits_fn(m.model), 1.0, BudgetPenalty(2))
        grads.append([p.grad.clone() for p in m.trainable_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_threshold_calibration_hits_the_target():
    from flexicli.train.calibration import calibrate_threshold
    from flexicli.train.loop import heldout_metrics

    fm, rows, _ = setup()
    for layer in fm.layers:  # routers that spread their gates over (0, 1)
        torch.nn.init.normal_(layer.router.head.weight, std=2.0)
        layer.router.bias.data.zero_()
    tau = calibrate_threshold(fm, rows, 1.0, iters=12)
    with fm.routing(threshold=tau):
        assert abs(heldout_metrics(fm, rows)["mean_skipped_layers"] - 1.0) < 0.1


def test_threshold_calibration_interpolates_once_bracketed(monkeypatch):
    """A smooth count (as a trained model's over many tokens): the search extrapolates by the secant until it
    brackets the target, then interpolates, and lands within tolerance in a few probes where stepping and bisection
    took twice as many (measured on SmolLM2's validation rows: docs/results.md)."""
    from flexicli.train import calibration

    fm, rows, _ = setup()
    probes = []

    def count(*a, **k):  # 28 units, skipped more as the threshold (in logit space) rises, smoothly
        probes.append(28 * torch.sigmoid(torch.tensor(threshold_logit(fm.state.threshold) - 0.3)).item())
        return probes[-1]

    monkeypatch.setattr(calibration, "mean_skipped", count)
    answer = 0.3 + math.log(4 / 24)  # the logit where the count is 4
    # bisection took 8 probes from near, 11 from far; this search 3 and 5
    for start, most in ((threshold_of(answer + 0.3), 4), (0.5, 6)):  # near (a trained threshold), far (the default)
        probes[:] = []
        tau = calibration.calibrate_threshold(fm, rows, 4.0, tol=0.02, start=start)
        assert abs(probes[-1] - 4.0) <= 0.02 and len(probes) <= most, probes
        assert threshold_logit(tau) == pytest.approx(answer, abs=0.01)


def test_threshold_calibration_from_a_near_start_takes_few_probes(monkeypatch):
    """Started at a threshold near the answer (a trained one), the search brackets the target in a step or two and
    stops at the first probe within tolerance; a target beyond reach ends at the end of the range."""
    from flexicli.train import calibration

    fm, rows, _ = setup()
    for layer in fm.layers:
        torch.nn.init.normal_(layer.router.head.weight, std=2.0)
        layer.router.bias.data.zero_()
    probes = []
    real = calibration.mean_skipped
    monkeypatch.setattr(calibration, "mean_skipped", lambda *a, **k: probes.append(real(*a, **k)) or probes[-1])
    far = calibration.calibrate_threshold(fm, rows, 1.0, tol=0.01, start=1e-6)
    n_far, probes[:] = len(probes), []
    near = calibration.calibrate_threshold(fm, rows, 1.0, tol=0.01, start=far)
    assert abs(probes[-1] - 1.0) <= 0.01 and len(probes) == 1 and near == pytest.approx(far)  # the answer: one probe
    probes[:] = []
    calibration.calibrate_threshold(fm, rows, 1.0, tol=0.01, start=threshold_of(threshold_logit(far) + 0.3))
    assert abs(probes[-1] - 1.0) <= 0.01 and len(probes) < n_far
    probes[:] = []
    assert calibration.calibrate_threshold(fm, rows, 5.0, start=0.5) == threshold_of(16.0)  # 2 routed layers
    assert len(probes) < 16
    for layer in fm.layers:  # every token's gate the same: the count jumps from 0 to 2 at one threshold
        monkeypatch.setattr(layer.router, "infer", lambda z: torch.full(z.shape[:-1], 0.6))
    probes[:] = []
    tau = calibration.calibrate_threshold(fm, rows, 1.0, start=0.5)
    assert len(probes) < 16 and set(probes) == {0.0, 2.0}
    assert abs(threshold_logit(tau) - threshold_logit(0.6)) < 1e-3  # stopped at the jump, not 16 probes on


def test_mean_skipped_from_cached_prefix_equals_full_pass():
    """Calibration starts each pass at the first routed layer from cached hidden states: same count as a full pass."""
    from flexicli.train.teacher import TeacherCache, first_routed_inputs
    from flexicli.train.calibration import mean_skipped

    fm = FlexiModel.wrap(peaky_tiny(), routed_layers=[1], base_model="tiny")  # layer 0 runs before the routing
    for layer in fm.layers:
        torch.nn.init.normal_(layer.router.head.weight, std=2.0)
        layer.router.bias.data.zero_()
    rows = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    full = mean_skipped(fm, rows, batch_size=4)
    assert 0.1 < full < 0.9  # some tokens skip, some run: the count says something
    prefix = first_routed_inputs(fm, rows)  # what calibration uses: the cache's prefix without the layers after it
    assert torch.equal(prefix, TeacherCache(fm, rows).prefix)
    assert mean_skipped(fm, rows, batch_size=4, prefix=prefix) == full


@pytest.mark.parametrize("family,hidden_weight", [("llama", 0.0), ("gpt2", 0.0), ("llama", 1.0)])
def test_teacher_cache_gives_the_same_step(family, hidden_weight):
    """A step from cached teacher/prefix hidden states equals a step that recomputes them (with the per-layer
    hidden-state term: also from cached routed-layer outputs)."""
    from flexicli.train.objectives import logits_fn
    from flexicli.train.teacher import TeacherCache
    from flexicli.train.loop import train_step

    routed = [0, 1] if hidden_weight else [1]  # two routed layers: the cached outputs must keep their order
    fm = FlexiModel.wrap(peaky_tiny(family, sharpen=8.0), routed_layers=routed, base_model="tiny")  # GPT-2 ties it
    rows = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    for layer in fm.layers:  # some tokens run, some skip
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
        layer.router.bias.data.fill_(0.0)
    cache = TeacherCache(fm, rows, layers=hidden_weight > 0)
    idx = torch.tensor([4, 1, 3])
    results = []
    for cached in (None, cache.lookup(idx, "cpu")):
        for p in fm.trainable_parameters():
            p.grad = None
            p.requires_grad_(True)
        out = train_step(fm, rows[idx], cfg(hidden_weight=hidden_weight), logits_fn(fm.model), 1.0,
                         BudgetPenalty(2), cached=cached)
        results.append((out["loss"], [p.grad.clone() for p in fm.trainable_parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-6 and loss_a > 0
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-6)


def test_router_warm_start_ranks_tokens_and_sets_the_budget():
    """After the warm start each router orders tokens like its layer's influence (1 - cos(h_in, h_out)), and the
    routed model skips about the target number of layers before any training step."""
    from flexicli.train.router_init import unit_influence, warm_start_routers
    from flexicli.train.calibration import mean_skipped

    fm = FlexiModel.wrap(peaky_tiny(), routed_layers=[0, 1], base_model="tiny")
    rows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    with fm.routing(threshold=0.5):
        assert mean_skipped(fm, rows) == 0.0  # fresh routers run everything
    report = warm_start_routers(fm, rows, skip_target=0.75)
    # (report["spearman_heldout"] is low on a random tiny model, whose influence depends on context a router
    # cannot see; it is measured on SmolLM2 in the README. Here: the fit itself works, on the tokens it saw.)
    assert abs(sum(report["target_skip_rate"].values()) - 0.75) < 0.05
    zs, influence = unit_influence(fm, rows)
    for i, layer in enumerate(fm.layers):
        with torch.no_grad():
            w = layer.router(zs[i])
        ranks = torch.stack([w.argsort().argsort().float(), influence[:, i].argsort().argsort().float()])
        assert torch.corrcoef(ranks)[0, 1] > 0.4, i  # 3/4 of these tokens were fitted on
    # layer 1 sees the student's changed input, so the count drifts a little from 0.75
    assert abs(mean_skipped(fm, rows) - 0.75) < 0.3


def test_trim_metrics_drops_lines_past_the_saved_step_and_a_torn_one(tmp_path):
    import json

    from flexicli.train.resume import trim_metrics

    path = tmp_path / "metrics.jsonl"
    lines = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    path.write_text(lines + '{"step": 6, "lo')
    trim_metrics(path, 5)
    assert path.read_text() == lines
    trim_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    trim_metrics(path, 0)
    assert path.read_text() == ""


def test_resume_without_train_state(tmp_path):
    """--resume where no step was saved yet (a run killed before its first save) starts from step 0, equal to a
    run without --resume, and drops the stray metrics lines; a trained folder without its state is an error."""
    from flexicli.core.checkpoint import read_weights
    from flexicli.core.errors import BadInput

    fm_a, rows, _ = setup(tmp_path / "a")
    fm_b, _, _ = setup(tmp_path / "b")
    (tmp_path / "b" / "ckpt" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # the killed run's
    said = []
    train(fm_a, cfg(steps=4), rows=rows, heldout=None, progress=False, log=lambda m: None)
    train(fm_b, cfg(steps=4), rows=rows, heldout=None, progress=False, log=said.append, resume=True)
    assert any("starting from step 0" in m for m in said), said
    for k, v in read_weights(tmp_path / "a" / "ckpt").items():
        assert torch.equal(v, read_weights(tmp_path / "b" / "ckpt")[k]), k
    assert len((tmp_path / "b" / "ckpt" / "metrics.jsonl").read_text().splitlines()) == 4
    (tmp_path / "b" / "ckpt" / "train_state.safetensors").unlink()
    with pytest.raises(BadInput, match="trained but has no train_state"):
        train(fm_b, cfg(steps=4), rows=rows, heldout=None, progress=False, log=lambda m: None, resume=True)


def test_token_id_data_for_a_model_without_tokenizer(tmp_path):
    import json

    from flexicli.data.text import pack, read_data
    from flexicli.core.errors import BadInput
    from flexicli.train.loop import training_rows

    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps({"input_ids": list(range(i, i + 10))}) + "\n" for i in range(3, 9)))
    assert pack(None, read_data(str(path), None), 16).tolist()[0] == list(range(3, 13)) + list(range(4, 10))
    fm, _, _ = setup()
    assert training_rows(fm, cfg(data=str(path), seq_len=16)).shape == (6, 16)  # each row begins an item
    path.write_text(json.dumps({"input_ids": [5, 500]}) + "\n")  # the tiny vocabulary is 128
    with pytest.raises(BadInput, match="outside the model's vocabulary"):
        training_rows(fm, cfg(data=str(path), seq_len=2))
    path.write_text(json.dumps({"input_ids": [5, "x"]}) + "\n")
    with pytest.raises(BadInput, match="list of token ids"):
        read_data(str(path), None)
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(BadInput, match="no tokenizer"):
        pack(None, read_data(str(path), None), 4)


def test_cli_resume_with_nothing_saved_needs_the_target(tmp_path, tiny_folder):
    from click.testing import CliRunner

    from flexicli.cli import main
    from flexicli.convert import convert

    convert(str(tiny_folder), tmp_path / "ckpt")
    r = CliRunner().invoke(main, ["train", "-m", str(tmp_path / "ckpt"), "--resume"])
    assert r.exit_code == 2 and "--skip-target is required: no step of a run was saved" in r.output, r.output


def test_penalty_balance_starts_lambda_where_the_count_stops_moving():
    """penalty_balance's lambda, put into the budget term as training uses it (budget.loss), leaves the skipped
    count still to first order along Adam's direction; lambda = 0 lets the distillation loss pull it down."""
    from flexicli.train.loop import _forward, penalty_balance
    from flexicli.train.objectives import logits_fn
    from flexicli.train.router_init import warm_start_routers

    fm = FlexiModel.wrap(peaky_tiny(), routed_layers=[0, 1], base_model="tiny")
    rows = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    warm_start_routers(fm, rows, skip_target=1.0)
    c = cfg(router_init="influence")
    for p in fm.trainable_parameters():
        p.requires_grad_(True)
    routers = [p for layer in fm.layers for r in layer.routers.values() for p in r.parameters()]
    head, batches = logits_fn(fm.model), [rows[batch_indices(16, 0, m, 4)] for m in range(4)]
    # the sharpened tiny head makes the KL (and its pull) far larger than on a real model: within the default
    # anti-windup limit there is no balance, and the limit is what penalty_balance returns
    assert penalty_balance(fm, batches, c, head, 1.0, BudgetPenalty(fm.capacity), routers) == 1.0
    budget = BudgetPenalty(fm.capacity, limit=100.0)
    lam = penalty_balance(fm, batches, c, head, 1.0, budget, routers)
    assert 1.0 < lam < budget.limit

    def count_drift(lam):  # d(count) along -m/rms of the whole loss's gradients, each batch a step
        budget.lam = lam
        grads, counts = [], []
        for batch in batches:
            f = _forward(fm, batch, c, head, 1.0, budget)
            g = torch.autograd.grad(f["main"] + f["extra"], routers, retain_graph=True)
            s = torch.autograd.grad(f["skipped_st"].mean(), routers)
            grads.append(torch.cat([x.flatten() for x in g]))
            counts.append(torch.cat([x.flatten() for x in s]))
        g, s = torch.stack(grads), torch.stack(counts).mean(0)
        return -float((s * g.mean(0) / (g.pow(2).mean(0).sqrt() + 1e-12)).sum())

    at_zero, at_balance = count_drift(0.0), count_drift(lam)
    assert at_zero < 0, "without the budget term the distillation loss lowers the count"
    assert abs(at_balance) < 0.05 * abs(at_zero), (at_zero, at_balance)


def test_train_with_the_penalty_started_at_its_balance_records_it():
    fm, rows, heldout = setup()
    summary = train(fm, cfg(router_init="influence", penalty_start="balance", steps=4), rows=rows, heldout=heldout,
                    progress=False, log=lambda m: None)
    assert 0 < summary["penalty_start"] <= 1.0 and fm.config.training["penalty_start"] == summary["penalty_start"]
    with pytest.raises(Exception, match="penalty_start must be"):
        cfg(penalty_start="half").check()


@pytest.mark.parametrize("lazy", [True, False])
def test_teacher_cache_computes_a_repeated_row_once(lazy):
    """`mix` repeats its conversations: a repeated row is one teacher pass, and every copy reads the same values
    (by lookup, and by row number in .prefix / .final for an eager cache)."""
    from flexicli.train.teacher import TeacherCache

    fm = FlexiModel.wrap(peaky_tiny(), routed_layers=[1], base_model="tiny")
    base = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([base, base[[1, 0]]])  # rows 3 and 4 repeat rows 1 and 0
    calls = []
    cache = TeacherCache.__new__(TeacherCache)
    fill = TeacherCache._fill
    TeacherCache._fill = lambda self, idx: (calls.append(idx.tolist()), fill(self, idx))[1]
    try:
        cache.__init__(fm, rows, batch_size=2, lazy=lazy)
        prefix, final = cache.lookup(torch.tensor([3, 4, 1, 0, 2]), "cpu")
    finally:
        TeacherCache._fill = fill
    assert sorted(i for c in calls for i in c) == [0, 1, 2]  # each distinct row once
    fresh = TeacherCache(fm, base)
    torch.testing.assert_close(prefix, fresh.prefix[[1, 0, 1, 0, 2]])
    torch.testing.assert_close(final, fresh.final[[1, 0, 1, 0, 2]])
    if not lazy:
        torch.testing.assert_close(cache.final[3:], fresh.final[[1, 0]])


def test_checkpoint_is_the_best_on_validation_and_resumes_so(tmp_path, monkeypatch):
    """select: the checkpoint holds the weights (here the average) of the evaluation with the lowest validation KL,
    not the last one's, and a run killed after that evaluation resumes to the same choice. The validation KLs are
    scripted (0.5, 0.1, 0.15 at steps 2, 4, 6) so that the best is not the last (and 0.15 is not a divergence: not
    over rollback x the best). A state saved before the selection compared candidates at the target count is not
    resumed to its choice."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import flexicli.train.loop as loop
    from flexicli.train.resume import TRAIN_STATE, saved_weights

    real = loop.heldout_metrics
    _, rows, heldout = setup()
    validation = rows[:3]

    def scripted(kls):
        def metrics(fm, r, batch_size=4):
            m = real(fm, r, batch_size)
            return {**m, "kl": kls.pop(0)} if r.shape == validation.shape and torch.equal(r, validation) else m
        return metrics

    def run(name, kls, stop_after=None, resume=False, **kw):
        monkeypatch.setattr(loop, "heldout_metrics", scripted(kls))
        fm = tiny_at(tmp_path / name, resume)
        c = cfg(steps=6, eval_every=2, save_every=1, ema=0.6, calibrate=True, **kw)
        summary = train(fm, c, rows=rows, heldout=heldout, validation=validation, progress=False,
                        log=lambda m: None, stop_after=stop_after, resume=resume)
        return summary, [p.detach().clone() for p in fm.trainable_parameters()]

    summary, chosen = run("a", [0.5, 0.1, 0.15])
    assert set(summary["wall_seconds"]) == {"data", "warm_starts", "steps", "finish"}
    assert summary["selected_step"] == 4 and summary["selected_validation_kl"] == pytest.approx(0.1)
    run("b", [0.5, 0.1], stop_after=4)
    at_4 = saved_weights(tmp_path / "b")["ema"]  # the average as it stood at step 4
    assert all(torch.allclose(c, e, atol=1e-6) for c, e in zip(chosen, at_4))
    final = saved_weights(tmp_path / "a")["ema"]
    assert any(not torch.allclose(c, e, atol=1e-6) for c, e in zip(chosen, final)), "step 4 must differ from 6"
    resumed_summary, resumed = run("b", [0.9], resume=True)
    assert resumed_summary["selected_step"] == 4
    assert all(torch.allclose(c, r, atol=1e-6) for c, r in zip(chosen, resumed))
    # a training state saved before candidates were compared at the target count (its selection has no
    # "at_target"): its step-4 score is not comparable, so the resumed run picks among what it evaluates itself
    run("d", [0.5, 0.1], stop_after=4)
    state = tmp_path / "d" / TRAIN_STATE
    with safe_open(state, "pt") as f:
        meta, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    scalars = json.loads(meta["scalars"])
    assert {k: scalars["selected"][k] for k in ("step", "kl", "at_target")} == {"step": 4, "kl": pytest.approx(0.1),
                                                                              "at_target": True}
    del scalars["selected"]["at_target"]
    save_file(flat, state, metadata={**meta, "scalars": json.dumps(scalars)})
    old_summary, _ = run("d", [0.9], resume=True)
    assert old_summary["selected_step"] == 6 and old_summary["selected_validation_kl"] == pytest.approx(0.9)
    off_summary, off = run("c", [0.5, 0.1, 0.15], select=False)  # off: the last average, as before
    assert "selected_step" not in off_summary
    assert all(torch.allclose(o, e, atol=1e-6) for o, e in zip(off, final))


def test_a_diverged_run_goes_back_to_the_best_weights(tmp_path, monkeypatch):
    """rollback: an evaluation whose validation KL is over cfg.rollback x the best so far (scripted: 0.5, 0.1, 0.9,
    0.15 at steps 2, 4, 6, 8) puts back the best's weights (live and average) and budget state, resets Adam, and
    halves the learning rate, re-warmed; a run killed right after the rollback resumes to the same end; off (0) and
    without a divergence, nothing happens."""
    from safetensors import safe_open

    import flexicli.train.loop as loop
    from flexicli.train.resume import TRAIN_STATE, saved_weights

    real = loop.heldout_metrics
    _, rows, heldout = setup()
    validation = rows[:3]

    def run(name, kls, stop_after=None, resume=False, **kw):
        def metrics(fm, r, batch_size=4):
            m = real(fm, r, batch_size)
            return {**m, "kl": kls.pop(0)} if r.shape == validation.shape and torch.equal(r, validation) else m

        monkeypatch.setattr(loop, "heldout_metrics", metrics)
        fm = tiny_at(tmp_path / name, resume)
        c = cfg(steps=8, eval_every=2, save_every=1, ema=0.6, calibrate=True, warmup=2, **kw)
        logged = []
        summary = train(fm, c, rows=rows, heldout=heldout, validation=validation, progress=False, log=logged.append,
                        stop_after=stop_after, resume=resume)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [p.detach().clone() for p in fm.trainable_parameters()], records, logged, c

    summary, final, records, logged, c = run("a", [0.5, 0.1, 0.9, 0.15])
    assert summary["rollbacks"] == [6] and summary["selected_step"] == 4
    assert records[5]["rollback"] == {"to_step": 4, "lr_factor": 0.5}
    assert any("back to step 4's weights" in m for m in logged)
    for r in records:  # full rate to step 6; then half, re-warmed over 2 steps (steps 7 and 8: 1/2, 2/2 of it)
        want = loop.lr_at(r["step"] - 1, c) * (1.0 if r["step"] <= 6 else 0.5 * min(1.0, (r["step"] - 6) / 2))
        assert r["lr"] == pytest.approx(want), r["step"]
    # killed right after the rollback's save: live weights and average are the best's, Adam empty, budget the best's
    _, at_6, _, _, _ = run("b", [0.5, 0.1, 0.9], stop_after=6)
    kept = saved_weights(tmp_path / "b")
    assert all(torch.allclose(w, b) and torch.allclose(e, b) for w, e, b in zip(at_6, kept["ema"], kept["best"]))
    with safe_open(tmp_path / "b" / TRAIN_STATE, "pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        assert not any(k.split(".", 1)[0].isdigit() for k in f.keys()), "Adam's moments must start afresh"
    assert scalars["rollbacks"] == [6] and scalars["budget"] == scalars["selected"]["budget"]
    resumed, after, _, _, _ = run("b", [0.15], resume=True)
    assert resumed["rollbacks"] == [6]
    assert all(torch.allclose(a, r, atol=1e-6) for a, r in zip(final, after))
    for name, kw in (("off", {"rollback": 0}), ("calm", {})):  # off, or no evaluation over 2x the best: no rollback
        s, _, recs, _, _ = run(name, [0.5, 0.1, 0.9 if kw else 0.19, 0.15], **kw)
        assert "rollbacks" not in s and not any("rollback" in r for r in recs)
        assert all(r["lr"] == pytest.approx(loop.lr_at(r["step"] - 1, c)) for r in recs)


def test_candidates_are_compared_at_the_target_count(tmp_path, monkeypatch):
    """select: each validation pass runs at the threshold that makes the candidate skip the target on the validation
    rows (what calibration gives the checkpoint), not at the trained one, where weights that skip less win on KL;
    without select, at the trained threshold as before."""
    import flexicli.train.loop as loop
    from flexicli.train.calibration import calibrate_threshold, mean_skipped

    real = loop.heldout_metrics
    _, rows, heldout = setup()
    validation = rows[:3]

    def run(name, select):
        seen = []

        def metrics(fm, r, batch_size=4):
            if r.shape == validation.shape and torch.equal(r, validation):
                want = calibrate_threshold(fm, r, 1.0, start=fm.config.threshold)  # what this candidate needs
                seen.append((fm.state.threshold, want, fm.config.threshold, mean_skipped(fm, r)))
            return real(fm, r, batch_size)

        monkeypatch.setattr(loop, "heldout_metrics", metrics)
        fm = tiny_at(tmp_path / name)
        c = cfg(steps=6, eval_every=2, save_every=6, ema=0.6, calibrate=True, select=select)
        train(fm, c, rows=rows, heldout=heldout, validation=validation, progress=False, log=lambda m: None)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return seen, [r["validation"] for r in records if "validation" in r]

    seen, records = run("on", True)
    assert len(seen) == len(records) == 3
    for (used, want, trained, skipped), rec in zip(seen, records):
        assert used == pytest.approx(want) and rec["threshold"] == pytest.approx(want)
        assert abs(skipped - 1.0) <= 0.05, (used, trained, skipped)  # 96 tokens: a few tokens off at most
        assert rec["mean_skipped_layers"] == pytest.approx(skipped)
    assert any(used != trained for used, _, trained, _ in seen)  # the trained threshold alone would not do
    seen, records = run("off", False)
    assert all(used == trained for used, _, trained, _ in seen) and all("threshold" not in r for r in records)


def test_validation_rows_are_their_own_prompts(smollm2, monkeypatch):
    """Data selfgen/mix: the validation prompts' conversations become the validation rows and never training rows;
    the three splits are disjoint; the answers are asked for in one list in file order (the cache key of before the
    split, so no answers are generated again)."""
    from types import SimpleNamespace

    import flexicli.data.text as text
    from flexicli.train.loop import training_data

    model, tok, _ = smollm2
    asked = []

    def answers(fm, prompts, max_new_tokens=96, progress=None):
        asked.append(list(prompts))
        return [f"Answer number {i}." for i in range(len(prompts))]

    monkeypatch.setattr(text, "teacher_answers", answers)
    rows, validation, source = training_data(SimpleNamespace(tokenizer=tok, model=model),
                                             cfg(data="selfgen", seq_len=64))
    assert source is None  # sources are told apart for data mix only
    splits = {s: set(text.builtin_prompts(s)) for s in ("train", "validation", "heldout")}
    assert [len(splits[s]) for s in splits] == [336, 37, 42]
    assert not (splits["train"] & splits["validation"] or splits["validation"] & splits["heldout"]
                or splits["train"] & splits["heldout"])
    assert asked == [text.builtin_prompts("train", "validation")]
    trained_on = tok.decode(rows.flatten())
    validated_on = [tok.decode(r) for r in text.unpadded(validation)]  # one conversation per row, cut at seq_len
    assert not [p for p in splits["validation"] if p in trained_on]
    assert len(validated_on) == 37
    assert sum(p in v for p, v in zip(text.builtin_prompts("validation"), validated_on)) >= 35
    assert sum(p in trained_on for p in splits["train"]) >= 330


def test_fact_prompts_are_answered_short_and_trained_on(smollm2, monkeypatch):
    """fact_prompts: the questions are answered in a call of their own, FACT_TOKENS long (the template prompts'
    answers keep their cache key), and their conversations are training rows, never validation rows."""
    from types import SimpleNamespace

    import flexicli.data.text as text
    from flexicli.train.loop import FACT_TOKENS, training_data

    model, tok, _ = smollm2
    asked = []

    def answers(fm, prompts, max_new_tokens=96, progress=None):
        asked.append((list(prompts), max_new_tokens))
        return [f"Answer number {i}." for i in range(len(prompts))]

    monkeypatch.setattr(text, "teacher_answers", answers)
    rows, validation, _ = training_data(SimpleNamespace(tokenizer=tok, model=model),
                                        cfg(data="selfgen", seq_len=64, fact_prompts=20))
    facts = text.fact_prompts(20)
    assert asked == [(text.builtin_prompts("train", "validation"), 96), (facts, FACT_TOKENS)]
    trained_on, validated_on = tok.decode(rows.flatten()), " ".join(map(tok.decode, text.unpadded(validation)))
    assert sum(q in trained_on for q in facts) >= 19 and not [q for q in facts if q in validated_on]


def test_hidden_state_term_is_zero_at_full_routing_and_moves_the_adapters(tmp_path):
    """The per-layer term compares the right tensors (zero when the routed model runs every layer), its gradient
    reaches the adapters of skipped tokens, and a cache without the layers' outputs is refused, not read as zero."""
    from flexicli.train.objectives import hidden_loss, logits_fn
    from flexicli.train.teacher import TeacherCache, routed_outputs
    from flexicli.train.loop import train_step

    fm, rows, _ = setup()
    decoder = fm.model.model
    with torch.no_grad(), fm.routing("full"), routed_outputs(fm) as teacher:
        decoder(input_ids=rows[:2])
    with torch.no_grad(), fm.routing("run"), routed_outputs(fm) as student:
        decoder(input_ids=rows[:2])
    assert len(teacher) == len(fm.layers) == 2
    assert hidden_loss(student, teacher).item() < 1e-10
    with torch.no_grad(), fm.routing("skip"), routed_outputs(fm) as skipped:
        decoder(input_ids=rows[:2])
    assert hidden_loss(skipped, teacher).item() > 1e-3

    for layer in fm.layers:  # some tokens run, some skip
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
        layer.router.bias.data.fill_(0.0)
    grads = {}
    for weight in (0.0, 1.0):
        for p in fm.trainable_parameters():
            p.grad = None
            p.requires_grad_(True)
        train_step(fm, rows[:4], cfg(hidden_weight=weight), logits_fn(fm.model), 1.0, BudgetPenalty(2))
        grads[weight] = [p.grad.clone() for p in fm.trainable_parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[1.0])), "the term must add gradient"
    fm.save(tmp_path / "ckpt")
    fm.path = tmp_path / "ckpt"
    train(fm, cfg(steps=2, hidden_weight=0.5), rows=rows, heldout=None, progress=False, log=lambda m: None)
    steps = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(r["hidden_loss"] > 0 for r in steps)  # logged, unweighted, per step
    with pytest.raises(RuntimeError, match="layers=True"):
        train_step(fm, rows[:4], cfg(hidden_weight=1.0), logits_fn(fm.model), 1.0, BudgetPenalty(2),
                   cached=TeacherCache(fm, rows).lookup(torch.tensor([0, 1, 2, 3]), "cpu"))


def test_answer_weights_find_the_answers_of_a_real_chat_template(smollm2):
    """SmolLM2's template: the position predicting an answer's k-th token weighs 1 + w / 2**k, from the assistant
    header's last token to the end of the turn; the system and user turns and the next conversation's prompt weigh 1."""
    from flexicli.data.text import conversations
    from flexicli.data.tokens import answer_header
    from flexicli.train.objectives import answer_weights
    from types import SimpleNamespace

    _, tok, _ = smollm2
    header, ends = answer_header(tok)
    assert tok.decode(header) == "<|im_start|>assistant\n" and tok.eos_token_id in ends
    texts = conversations(SimpleNamespace(tokenizer=tok), ["What is 2+3?", "Name a colour."], ["5", "Red, or blue."])
    ids = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts), [])
    w = answer_weights(torch.tensor([ids]), header, ends, 4.0)[0].tolist()
    weighted = [(tok.decode(ids[i + 1]), w[i]) for i in range(len(ids) - 1) if w[i] > 1]
    assert weighted == [("5", 5.0), ("<|im_end|>", 3.0), ("Red", 5.0), (",", 3.0), (" or", 2.0), (" blue", 1.5),
                        (".", 1.25), ("<|im_end|>", 1.125)]
    assert answer_weights(torch.tensor([ids]), header, ends, 0.0).eq(1).all()


def test_answer_weight_moves_the_gradient_and_is_refused_without_answers(monkeypatch):
    """answer_weight > 0 changes a step's gradient only through rows holding an answer; a run whose rows hold none
    (or a model without a chat template) is refused before step 0, not trained with every weight 1."""
    import flexicli.data.tokens as tokens
    from flexicli.core.errors import BadInput

    fm, rows, _ = setup()
    with pytest.raises(BadInput, match="chat template"):
        train(fm, cfg(steps=1, answer_weight=2.0), rows=rows, heldout=None, progress=False, log=lambda m: None)
    monkeypatch.setattr(tokens, "answer_header", lambda tok: ([1, 2], {0}))  # the tiny model's "template"
    with pytest.raises(BadInput, match="no assistant answers"):
        train(fm, cfg(steps=1, answer_weight=2.0), rows=rows, heldout=None, progress=False, log=lambda m: None)
    for layer in fm.layers:  # some tokens run, some skip
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
        layer.router.bias.data.fill_(0.0)

    def grads(batch, weight):
        return _step_grads(fm, batch, cfg(answer_weight=weight))[1]

    plain = rows[:4]
    assert all(torch.equal(a, b) for a, b in zip(grads(plain, 0.0), grads(plain, 4.0)))  # no answer: the same
    chat = plain.clone()
    chat[:, 10:12] = torch.tensor([1, 2])  # a header, then an answer up to the end of the row
    assert any(not torch.allclose(a, b) for a, b in zip(grads(chat, 0.0), grads(chat, 4.0)))


def _step_grads(fm, batch, config):
    """One train_step of `fm` on `batch` under `config` (skip target 1, the penalty budget) from zero gradients:
    (its record, a copy of every trainable parameter's gradient)."""
    from flexicli.train.loop import train_step
    from flexicli.train.objectives import logits_fn

    for p in fm.trainable_parameters():
        p.grad = None
        p.requires_grad_(True)
    out = train_step(fm, batch, config, logits_fn(fm.model), 1.0, BudgetPenalty(2))
    return out, [p.grad.clone() for p in fm.trainable_parameters()]


def test_top1_weight_reaches_the_step_and_is_checked():
    """top1_weight > 0 changes a step's gradient (a tiny routed model misses the teacher's top token somewhere), and
    top1_lead > 0 changes it again (matches now count too); a negative weight or lead, one under FlexiDepth's LM
    objective, or a lead with the term off, is refused."""
    from flexicli.core.errors import BadInput

    fm, rows, _ = setup()
    for layer in fm.layers:  # some tokens run, some skip
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
        layer.router.bias.data.fill_(0.0)
    (plain, g0), (with_term, g1) = (_step_grads(fm, rows[:4], cfg(top1_weight=w)) for w in (0.0, 0.5))
    assert plain["agree"] < 1  # misses exist, so the term has tokens to act on
    assert with_term["loss"] > plain["loss"] and any(not torch.allclose(a, b) for a, b in zip(g0, g1))
    wider, g2 = _step_grads(fm, rows[:4], cfg(top1_weight=0.5, top1_lead=50.0))  # every token short of the lead
    assert wider["loss"] > with_term["loss"] and any(not torch.allclose(a, b) for a, b in zip(g1, g2))
    with pytest.raises(BadInput, match="top1_lead must be at least 0"):
        cfg(top1_weight=0.5, top1_lead=-0.1).check()
    with pytest.raises(BadInput, match="top1_lead widens the top-1 term, which is off"):
        cfg(top1_weight=0.0, top1_lead=0.5).check()
    with pytest.raises(BadInput, match="top1_weight must be at least 0"):
        cfg(top1_weight=-1.0).check()
    with pytest.raises(BadInput, match="top1_weight applies to objective kl"):
        cfg(top1_weight=0.5, objective="lm").check()
    from flexicli.train.config import TOP1_WEIGHT

    default = TrainConfig(skip_target=1.0)
    assert default.top1 == TOP1_WEIGHT > 0 and cfg(top1_weight=0.0).top1 == 0  # on by default, off when set to 0
    lm = TrainConfig(skip_target=1.0, objective="lm")
    lm.check()  # the default is no error under the LM objective: there it is off
    assert lm.top1 == 0


def test_padded_heldout_rows_count_and_score_only_their_tokens():
    """Held-out rows of one text each (text.one_per_row) end in PAD: the skipped count, the calibrated threshold and
    the metrics are those of the texts alone, as flexi eval reads them."""
    from flexicli.data.text import PAD, unpadded
    from flexicli.train.calibration import calibrate_threshold, mean_skipped
    from flexicli.train.loop import heldout_metrics

    fm, _, heldout = setup()
    fm.set_threshold(0.5)
    with torch.no_grad():
        for layer in fm.layers:  # gates that differ by token, so the count depends on which tokens are counted
            for router in layer.routers.values():
                for p in router.parameters():
                    p.normal_(0, 0.3)
    lengths = [32, 9, 20, 2]
    padded = heldout.clone()
    for row, n in enumerate(lengths):
        padded[row, n:] = PAD
    assert unpadded(padded) == [heldout[row, :n].tolist() for row, n in enumerate(lengths)]
    alone = [mean_skipped(fm, heldout[row:row + 1, :n]) for row, n in enumerate(lengths)]
    expected = sum(a * n for a, n in zip(alone, lengths)) / sum(lengths)
    assert mean_skipped(fm, padded) == pytest.approx(expected, abs=1e-6)
    assert mean_skipped(fm, padded) != pytest.approx(mean_skipped(fm, heldout), abs=1e-3)  # the PAD would count
    metrics = heldout_metrics(fm, padded)
    assert metrics["scored_tokens"] == sum(n - 1 for n in lengths)
    assert metrics["mean_skipped_layers"] == pytest.approx(expected, abs=1e-6)
    threshold = calibrate_threshold(fm, padded, 0.8)
    with fm.routing(threshold=threshold):
        assert mean_skipped(fm, padded) == pytest.approx(0.8, abs=0.05)


def test_recipe_names_the_checkpoint_it_was_measured_on(tmp_path, tiny_folder):
    """A recipe's convert: section (adapter width) against the checkpoint: flexi train says what differs and the
    flag that matches, then trains; a matching checkpoint or a recipe without the section gets no note."""
    from click.testing import CliRunner

    from flexicli.cli import main
    from flexicli.cli.train import recipe_mismatch
    from flexicli.convert import convert

    assert load_recipe("gemma3-270m-cpu", "convert") == {"adapter_reduction": 16}
    assert load_recipe("smollm2-135m-cpu", "convert") == {"adapter_reduction": ADAPTER_REDUCTION}
    fm = FlexiModel.wrap(peaky_tiny("llama"), routed_layers=[0, 1], base_model="tiny")  # default: 128 / R wide
    width = 128 // ADAPTER_REDUCTION
    assert recipe_mismatch(fm, {"adapter_reduction": ADAPTER_REDUCTION}) == "" and recipe_mismatch(fm, {}) == ""
    assert f"8 wide (MLP width / 16); this checkpoint's are {width}" in recipe_mismatch(fm, {"adapter_reduction": 16})

    convert(str(tiny_folder), tmp_path / "ckpt")
    tokens = tmp_path / "tokens.jsonl"
    g = torch.Generator().manual_seed(0)
    tokens.write_text("".join(json.dumps({"input_ids": torch.randint(3, 128, (17,), generator=g).tolist()}) + "\n"
                              for _ in range(48)))
    recipe = tmp_path / "recipe.yaml"
    for reduction, noted, flag in ((16, True, "--recipe"), (ADAPTER_REDUCTION, False, "--recipe"),
                                   (16, True, "--config")):
        recipe.write_text(f"convert:\n  adapter_reduction: {reduction}\ntrain:\n  steps: 1\n  data: {tokens}\n"
                          "  seq_len: 16\n  batch_size: 2\n  eval_every: 1\n  router_init: none\n"
                          "  adapter_init: none\n  save_every: 1\n")
        r = CliRunner().invoke(main, ["train", "-m", str(tmp_path / "ckpt"), flag, str(recipe),
                                      "--skip-target", "1", "--json"])
        assert r.exit_code == 0, r.output
        said = " ".join(r.output.split())  # rich wraps the note at the terminal's width
        assert ("was measured on adapters 8 wide" in said) == noted, said
        assert ("--adapter-reduction 16 matches it" in said) == noted
