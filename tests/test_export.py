"""`flexi export`: the exported folder, loaded by stock transformers in a fresh Python process that never
imports flexicli, gives the same logits, decisions and greedy tokens as flexicli on the same input."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from flexicli.convert import convert
from flexicli.errors import CheckpointError
from flexicli.export import MODELING_FILE, export, modeling_source
from flexicli.model import FlexiModel

IDS = [[5, 17, 99, 3, 42, 8, 77, 12, 64, 31], [9, 9, 9, 9, 120, 4, 56, 7, 88, 23]]

# Runs in a fresh process: stock transformers only. Prints one JSON line per exported folder.
STOCK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[1]))  # as many as the test process: same reductions, same bits
ids = torch.tensor(json.loads(sys.argv[2]))
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # no remote code: the base
    model.flexi_state.records = []
    with torch.no_grad():
        logits = model(ids).logits
        plain_logits = plain(ids).logits
    n = len(model.flexi_state.records)
    ran = torch.stack([mask for _, mask in model.flexi_state.records], -1)
    model.flexi_state.records = None
    gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    torch.save({"logits": logits, "plain": plain_logits, "ran": ran, "gen": gen}, folder + ".stock.pt")
    print(json.dumps({"class": type(model).__name__, "plain_class": type(plain).__name__, "records": n,
                      "flexicli_imported": any(m.split(".")[0] == "flexicli" for m in sys.modules)}))
"""


def routed_checkpoint(family, tmp_path):
    """A tiny checkpoint whose routers skip some tokens and whose adapters do something."""
    base = tmp_path / f"{family}-base"
    tiny_model(family).save_pretrained(base)
    fm = convert(str(base), tmp_path / f"{family}-ckpt", layers="all")
    torch.manual_seed(1)
    for layer in fm.layers:
        torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
        layer.router.bias.data.zero_()
    fm.save(fm.path, overwrite=True)
    return fm.path


def test_stock_transformers_matches_flexicli_in_a_fresh_process(tmp_path):
    ids = torch.tensor(IDS)
    outs = []
    for family in ("llama", "gpt2"):  # two layouts: model.layers / transformer.h, different part names
        ckpt = routed_checkpoint(family, tmp_path)
        out = tmp_path / f"{family}-export"
        if family == "llama":  # once through the CLI
            r = subprocess.run([sys.executable, "-m", "flexicli", "export", "-m", str(ckpt), "-o", str(out), "--json"],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["model_class"] == "FlexiForCausalLM"
        else:
            export(ckpt, out)
        outs.append((ckpt, out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", STOCK, str(torch.get_num_threads()), json.dumps(IDS), *[str(o) for _, o in outs]],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    for (ckpt, out), report in zip(outs, reports):
        assert report["class"] == "FlexiForCausalLM" and not report["flexicli_imported"]
        stock = torch.load(f"{out}.stock.pt")
        fm = FlexiModel.load(ckpt)
        with torch.no_grad(), fm.record() as rec:
            logits = fm.model(ids).logits
        with torch.no_grad(), fm.routing("full"):
            original = fm.model(ids).logits
        ran = rec.decisions()
        assert 0.1 < ran.float().mean() < 0.9  # skipping really happens in this comparison
        assert torch.equal(stock["ran"], ran)
        assert torch.equal(stock["logits"], logits)
        assert torch.equal(stock["gen"], fm.model.generate(ids[:1], max_new_tokens=8, do_sample=False))
        assert report["plain_class"] != "FlexiForCausalLM" and torch.equal(stock["plain"], original)


def test_modeling_code_is_flexicli_source_without_flexicli():
    import flexicli.layer as layer

    src = modeling_source("LlamaForCausalLM")
    assert inspect.getsource(layer.FlexiLayer) in src and inspect.getsource(layer.Router) in src
    imports = [line.strip() for line in src.splitlines() if line.strip().startswith(("import ", "from "))]
    assert imports and not [i for i in imports if i.startswith("from .") or "flexicli" in i], imports
    assert src.rstrip().endswith("class FlexiForCausalLM(FlexiMixin, LlamaForCausalLM):\n    pass")


def test_export_is_atomic(tmp_path, tiny_folder, monkeypatch):
    ckpt = tmp_path / "ckpt"
    convert(str(tiny_folder), ckpt)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export(ckpt, tmp_path / "taken")

    def broken(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr("flexicli.export.modeling_source", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "taken", "tiny-llama"]  # no half folder, no temp
    monkeypatch.undo()
    info = export(ckpt, tmp_path / "out")
    assert MODELING_FILE in info["files"] and "model.safetensors" in info["files"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_flexi.FlexiForCausalLM"}
