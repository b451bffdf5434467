"""flexicli.lm_eval: our side of the lm-evaluation-harness contract, checked with a stand-in for the harness
(lm-eval itself is not installed here; the module says so)."""

import sys
import types

import pytest

from flexicli import lm_eval as flexi_lm_eval


@pytest.fixture
def fake_harness(monkeypatch):
    """Modules lm_eval.models.huggingface (HFLM records its arguments) and lm_eval.api.registry."""
    registry = {}

    class HFLM:
        def __init__(self, pretrained=None, tokenizer=None, batch_size=1, **kwargs):
            self.pretrained, self.tokenizer, self.batch_size, self.kwargs = pretrained, tokenizer, batch_size, kwargs

    def register_model(name):
        def deco(cls):
            registry[name] = cls
            return cls
        return deco

    mods = {name: types.ModuleType(name) for name in
            ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface", "lm_eval.api", "lm_eval.api.registry")}
    mods["lm_eval.models.huggingface"].HFLM = HFLM
    mods["lm_eval.api.registry"].register_model = register_model
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return registry


@pytest.fixture
def checkpoint(tmp_path):
    from conftest import tiny_model
    from flexicli.convert import convert
    from test_cli_eval import char_tokenizer

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    convert(str(base), tmp_path / "ckpt", device="cpu")
    return str(tmp_path / "ckpt")


def test_flexi_lm_wraps_the_loaded_checkpoint(fake_harness, checkpoint):
    lm = flexi_lm_eval.flexi_lm(checkpoint, routing="full", threshold=0.7, batch_size=4)
    assert lm.pretrained is lm.flexi.model and lm.tokenizer is lm.flexi.tokenizer and lm.batch_size == 4
    assert lm.flexi.state.mode == "full" and lm.flexi.state.threshold == 0.7


def test_register_adds_the_flexi_model_name(fake_harness, checkpoint):
    cls = flexi_lm_eval.register()
    assert fake_harness["flexi"] is cls
    lm = cls(pretrained=checkpoint, batch_size=2)
    assert lm.pretrained is lm.flexi.model and lm.flexi.state.mode == "routed"


def test_bad_routing_and_missing_harness(fake_harness, checkpoint, monkeypatch):
    from flexicli.errors import BadInput

    with pytest.raises(BadInput, match="routing"):
        flexi_lm_eval.flexi_lm(checkpoint, routing="sideways")
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # as if not installed
    with pytest.raises(BadInput, match="harness is not installed"):
        flexi_lm_eval.flexi_lm(checkpoint)


def test_retention_table():
    original = {"results": {"hellaswag": {"acc,none": 0.40, "acc_stderr,none": 0.01, "alias": "hellaswag"},
                            "arc_easy": {"acc,none": 0.0}}}
    routed = {"results": {"hellaswag": {"acc,none": 0.38, "acc_stderr,none": 0.01, "alias": "hellaswag"},
                          "arc_easy": {"acc,none": 0.1}}}
    table = flexi_lm_eval.retention_table(original, routed)
    assert set(table) == {"hellaswag/acc,none", "arc_easy/acc,none"}
    assert table["hellaswag/acc,none"]["retention"] == pytest.approx(0.95)
    assert table["arc_easy/acc,none"]["retention"] is None
