"""`flexi export`: the exported folder, loaded by stock transformers in a fresh Python process that never
imports flexicli, gives the same logits, decisions and greedy tokens as flexicli on the same input."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from flexicli.convert import convert
from flexicli.core.errors import CheckpointError
from flexicli.sharing.export import MODELING_FILE, export, modeling_source
from flexicli.core.flexi_model import FlexiModel

IDS = [[5, 17, 99, 3, 42, 8, 77, 12, 64, 31], [9, 9, 9, 9, 120, 4, 56, 7, 88, 23]]

# Runs in a fresh process: stock transformers only. Prints one JSON line per exported folder.
STOCK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
opts = json.loads(sys.argv[1])
torch.set_num_threads(opts["threads"])  # as many as the test process: same reductions, same bits
ids = torch.tensor(opts["ids"])
for folder, save in opts["folders"]:  # a folder or a Hub id (from the cache), and where to save the results
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    if opts.get("threshold") is not None:
        model.flexi_state.threshold = opts["threshold"]
    model.flexi_state.records = []
    with torch.no_grad():
        logits = model(ids).logits
    ran = torch.stack([mask for _, mask in model.flexi_state.records], -1)
    model.flexi_state.records = None
    gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    out = {"logits": logits, "ran": ran, "gen": gen}
    report = {"class": type(model).__name__}
    if opts.get("plain"):  # without trust_remote_code: the plain base model
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out["plain"] = plain(ids).logits
        report["plain_class"] = type(plain).__name__
    torch.save(out, save)
    print(json.dumps({**report, "flexicli_imported": any(m.split(".")[0] == "flexicli" for m in sys.modules)}))
"""


def run_stock(env, **opts):
    opts["threads"] = torch.get_num_threads()
    return subprocess.run([sys.executable, "-c", STOCK, json.dumps(opts)], capture_output=True, text=True, env=env)


def routed_checkpoint(family, tmp_path, **kw):
    """A tiny checkpoint whose routers skip some tokens and whose adapters do something."""
    base = tmp_path / f"{family}-base"
    tiny_model(family).save_pretrained(base)
    fm = convert(str(base), tmp_path / f"{family}-ckpt", layers="all", **kw)
    torch.manual_seed(1)
    for layer in fm.layers:
        torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
        for router in layer.routers.values():  # flexidepth: head and bias; linear: proj
            lin = router.head if hasattr(router, "head") else router.proj
            torch.nn.init.normal_(lin.weight, std=1.0 if hasattr(router, "head") else 0.3)
            (router.bias if hasattr(router, "head") else router.proj.bias).data.zero_()
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
    # The llama export once more by Hub id, from a cache laid out as huggingface_hub lays it out (offline).
    snap = tmp_path / "hub" / "models--alice--tiny-export" / "snapshots" / ("e" * 40)
    shutil.copytree(outs[0][1], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("e" * 40)
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    folders = [[str(o), f"{o}.stock.pt"] for _, o in outs] + [["alice/tiny-export", str(tmp_path / "by-id.stock.pt")]]
    r = run_stock(env, ids=IDS, folders=folders, plain=True)
    assert r.returncode == 0, r.stderr
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    outs.append((outs[0][0], tmp_path / "by-id"))
    for (ckpt, out), report in zip(outs, reports, strict=True):
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


@pytest.mark.parametrize("unit,router", [("module", "linear"), ("mlp", "flexidepth")])
def test_stock_transformers_runs_the_skip_units(tmp_path, unit, router):
    """An exported `module` / `mlp` checkpoint: same logits, per-unit decisions and greedy tokens in stock
    transformers as in flexicli."""
    ids = torch.tensor(IDS)
    ckpt = routed_checkpoint("llama", tmp_path, skip_unit=unit, router=router)
    out = tmp_path / "export"
    export(ckpt, out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = run_stock(env, ids=IDS, folders=[[str(out), f"{out}.stock.pt"]])
    assert r.returncode == 0, r.stderr
    assert not json.loads(r.stdout.splitlines()[0])["flexicli_imported"]
    stock = torch.load(f"{out}.stock.pt")
    fm = FlexiModel.load(ckpt)
    with torch.no_grad(), fm.record() as rec:
        logits = fm.model(ids).logits
    ran = rec.decisions()
    assert ran.shape[-1] == len(fm.unit_keys) == (4 if unit == "module" else 2)
    assert 0.1 < ran.float().mean() < 0.9
    assert torch.equal(stock["ran"], ran) and torch.equal(stock["logits"], logits)
    assert torch.equal(stock["gen"], fm.model.generate(ids[:1], max_new_tokens=8, do_sample=False))


def test_modeling_code_is_flexicli_source_without_flexicli():
    import flexicli.core.routed_layer as layer

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

    monkeypatch.setattr("flexicli.sharing.export.modeling_source", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "taken", "tiny-llama"]  # no half folder, no temp
    monkeypatch.undo()
    info = export(ckpt, tmp_path / "out")
    assert MODELING_FILE in info["files"] and "model.safetensors" in info["files"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_flexi.FlexiForCausalLM"}


@pytest.mark.real
def test_real_smollm2_export_in_stock_transformers(tmp_path):
    """The embedded SmolLM2 exported with its tokenizer and chat template; a fresh stock-transformers process
    generates the same tokens with the same skips as flexicli. The threshold is set at the median gate of the
    prompt so that about half the routed (token, layer) pairs skip (a fresh checkpoint runs everything)."""
    import time

    fm = convert(None, tmp_path / "ckpt")
    t0 = time.perf_counter()
    info = export(fm.path, tmp_path / "export")
    export_s = time.perf_counter() - t0
    assert {"tokenizer.json", "chat_template.jinja", "model.safetensors"} <= set(info["files"])
    chat = [{"role": "user", "content": "Name three primary colours."}]
    ids = fm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    fm.state.gates = []
    with torch.no_grad():
        fm.model(ids)
    threshold = torch.cat([w.reshape(-1) for _, w, *_ in fm.state.gates]).median().item()
    fm.state.gates = None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    t0 = time.perf_counter()
    r = run_stock(env, ids=ids.tolist(), folders=[[str(tmp_path / "export"), f"{tmp_path / 'export'}.stock.pt"]],
                  threshold=threshold)
    stock_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert not json.loads(r.stdout)["flexicli_imported"]
    stock = torch.load(f"{tmp_path / 'export'}.stock.pt")
    with torch.no_grad(), fm.routing(threshold=threshold), fm.record() as rec:
        logits = fm.model(ids).logits
    ran = rec.decisions()
    with fm.routing(threshold=threshold):
        gen = fm.model.generate(ids, max_new_tokens=8, do_sample=False)
    print(f"\nSmolLM2 export: {info['bytes'] / 1e6:.0f} MB in {export_s:.1f} s; stock process (load, "
          f"forward, 8 tokens) {stock_s:.1f} s; threshold {threshold:.4f}, {100 * (1 - ran.float().mean()):.0f}% "
          f"of routed (token, layer) pairs skipped; max |logit diff| {(stock['logits'] - logits).abs().max():.2e}")
    assert 0.3 < ran.float().mean() < 0.7
    assert torch.equal(stock["ran"], ran) and torch.equal(stock["logits"], logits)
    assert torch.equal(stock["gen"], gen[:, :stock["gen"].shape[1]]) and stock["gen"].shape == gen.shape
