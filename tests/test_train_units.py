"""Training with the skip units of flexicli/units.py: the budget counts layer-equivalents for every unit, the
density budget (Learning to Skip's regulariser) hits --skip-target after calibration, resume equals an unbroken run."""

import pytest
import torch

from flexicli.checkpoint import read_weights
from flexicli.errors import BadInput
from flexicli.model import FlexiModel
from flexicli.objectives import BudgetDensity, gate_stats, unit_density, weighted_quantile
from flexicli.train import TrainConfig, train
from test_train import cfg, peaky_tiny


def setup(unit="module", router="flexidepth", tmp_path=None):
    fm = FlexiModel.wrap(peaky_tiny(), routed_layers=[0, 1], base_model="tiny", skip_unit=unit, router=router)
    g = torch.Generator().manual_seed(0)
    rows, heldout = torch.randint(3, 128, (16, 32), generator=g), torch.randint(3, 128, (4, 32), generator=g)
    if tmp_path is not None:
        fm.save(tmp_path)
        fm.path = tmp_path
    return fm, rows, heldout


def test_gate_stats_count_layer_equivalents():
    w = torch.tensor([[0.9, 0.2, 0.3]], requires_grad=True)  # one token, three units: attn 0.25, mlp 0.75, layer 1
    units = [((0, "attn"), 0.25), ((0, "mlp"), 0.75), (1, 1.0)]
    gates = [(k, w[:, i:i + 1], w[:, i:i + 1] > 0.5, c) for i, (k, c) in enumerate(units)]
    skipped, _, rates = gate_stats(gates)
    assert skipped.item() == pytest.approx(0.75 + 1.0) and rates.tolist() == [0.0, 1.0, 1.0]
    skipped.sum().backward()
    assert w.grad.tolist() == [[-0.25, -0.75, -1.0]]  # each unit's gradient weighs what skipping it saves
    density = unit_density([(k, w[:, i:i + 1], w[:, i:i + 1] > 0.5) for i, k in enumerate("abc")])
    assert density.tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_weighted_quantile_skips_a_share_of_compute():
    logits = torch.tensor([[-3.0, -1.0], [2.0, 1.0]]).flatten()  # two tokens x (attn cost 0.25, mlp cost 0.75)
    costs = torch.tensor([0.25, 0.75])
    t = weighted_quantile(logits, costs, 0.5)  # half the compute: the mlp of token 0 (0.75 of 2.0) is not enough
    assert -1.0 < t < 1.0  # below t: token 0's attn and mlp (0.25 + 0.75 = 1.0 of 2.0)


def test_density_budget_pulls_each_unit_toward_one_density():
    b = BudgetDensity(2.0, weight=1.0)
    assert b.density_target(0.5) == 0.75 and b.density_target(2.0) == 0.0
    d = torch.tensor([1.0, 0.5], requires_grad=True)
    b.loss(0.5, None, d).backward()
    assert d.grad.tolist() == pytest.approx([0.5, -0.5])  # descent lowers the dense unit, raises the sparse one


def test_skip_target_is_bounded_by_what_the_units_can_skip():
    fm, rows, heldout = setup("mlp")
    with pytest.raises(BadInput, match=r"outside 0\.\.1\.5 \(layer-equivalents"):
        train(fm, cfg(skip_target=1.9), rows=rows, heldout=heldout, progress=False, log=lambda m: None)


@pytest.mark.parametrize("unit,router,budget,target", [("module", "flexidepth", "density", 1.0),
                                                      ("layer", "flexidepth", "density", 1.0),
                                                      ("mlp", "linear", "penalty", 0.75),
                                                      ("module", "linear", "threshold", 1.0)])
def test_budget_is_hit_in_layer_equivalents(unit, router, budget, target):
    fm, rows, heldout = setup(unit, router)
    summary = train(fm, cfg(steps=60, skip_target=target, budget=budget, calibrate=True), rows=rows, heldout=heldout,
                    progress=False, log=lambda m: None)
    assert summary["trained_threshold_skipped"] >= 0.3, summary  # training moved the count, calibration lands it
    assert abs(summary["mean_skipped_layers"] - target) <= 0.5, summary
    rates = summary["per_layer_skip_rate"]
    assert list(rates) == fm.unit_labels
    assert summary["mean_skipped_layers"] == pytest.approx(fm.layer_equivalents(rates.values()), abs=1e-6)


def test_resume_equals_unbroken_run_module_density(tmp_path):
    c = dict(steps=8, save_every=100, budget="density")
    fm_a, rows, _ = setup("module", tmp_path=tmp_path / "a")
    train(fm_a, cfg(**c), rows=rows, heldout=None, progress=False, log=lambda m: None)
    fm_b, _, _ = setup("module", tmp_path=tmp_path / "b")
    train(fm_b, cfg(**c), rows=rows, heldout=None, progress=False, log=lambda m: None, stop_after=3)  # "killed"
    fm_c, _, _ = setup("module")  # as in a fresh process
    fm_c.load_flexi_state_dict(read_weights(tmp_path / "b"))
    fm_c.path = tmp_path / "b"
    train(fm_c, cfg(**c), rows=rows, heldout=None, progress=False, log=lambda m: None, resume=True)
    for k, v in fm_a.flexi_state_dict().items():
        assert torch.allclose(v, fm_c.flexi_state_dict()[k], atol=1e-6), k


@pytest.mark.parametrize("flag", [{"router_init": "influence"}, {"adapter_init": "fit"}])
def test_whole_layer_inits_refuse_other_units(flag):
    fm, rows, heldout = setup("module")
    with pytest.raises(BadInput, match="fit whole layers; this checkpoint's skip unit is 'module'"):
        train(fm, cfg(**flag), rows=rows, heldout=heldout, progress=False, log=lambda m: None)
