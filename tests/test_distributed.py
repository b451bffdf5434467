"""Distributed training on CPU (gloo): 2 processes end where 1 process ends with the same global batch.

The test starts this file as a script under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node 2
tests/test_distributed.py OUT`); each rank trains the tiny model data parallel, then under FSDP, and writes its final
weights to OUT/ddp and OUT/fsdp.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from flexicli.train.loop import distributed
from flexicli.core.errors import BadInput
from flexicli.core.flexi_model import FlexiModel
from flexicli.train.config import TrainConfig
from flexicli.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def make_model():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # a peaky head, so the KL has something to preserve
    return FlexiModel.wrap(model, routed_layers=[1], base_model="tiny")  # layer 0 unrouted: FSDP shards it whole


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (16, 32), generator=g), torch.randint(3, 128, (4, 32), generator=g)


# each launch mode trains under one budget kind, so both kinds' cross-rank paths are covered by one launch
BUDGET = {"ddp": "penalty", "fsdp": "threshold"}


def config(budget: str):
    # grad_accum 2: accumulation and the cross-rank mean must compose; eval_every 3: held-out eval mid-run on all ranks
    return TrainConfig(skip_target=0.5, steps=STEPS, batch_size=4, grad_accum=2, seq_len=32, lr=1e-2, warmup=2,
                       budget=budget, router_init="none", adapter_init="none",  # the warm start is single-process only
                       eval_every=3, save_every=100, calibrate=False)


def run(folder: Path, budget: str):
    fm = make_model()
    rows, heldout = data()
    dist = distributed.current()
    folder.parent.mkdir(parents=True, exist_ok=True)
    dist.on_main(fm.save, folder)
    return fm, train(fm, config(budget), folder=folder, rows=rows, heldout=heldout, progress=False, log=lambda m: None)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    refs = {}
    for mode, budget in BUDGET.items():
        folder = tmp_path_factory.mktemp("one") / mode
        fm, summary = run(folder, budget)
        refs[mode] = {k: v.clone() for k, v in fm.flexi_state_dict().items()}, summary, read_metrics(folder)
    return refs


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch of 2 processes: a data-parallel run into OUT/ddp, then an FSDP run into OUT/fsdp."""
    out = tmp_path_factory.mktemp("two")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "FLEXI_FSDP", "ACCELERATE_USE_FSDP"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(launched, reference, fsdp):
    from safetensors.torch import load_file

    from flexicli.core.checkpoint import read_weights

    mode = "fsdp" if fsdp else "ddp"
    ref_weights, ref_summary, ref_metrics = reference[mode]
    tmp_path = launched / mode
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    saved = read_weights(tmp_path / "ckpt")
    for k, ref in ref_weights.items():
        for got in (ranks[0][k], ranks[1][k], saved[k]):
            assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (k, (got - ref).abs().max())
    assert any(not torch.equal(v, make_model().flexi_state_dict()[k]) for k, v in ref_weights.items()), \
        "the weights must have moved, or the comparison proves nothing"

    metrics = read_metrics(tmp_path / "ckpt")
    assert len(metrics) == STEPS, "only rank 0 writes metrics.jsonl"
    for got, ref in zip(metrics, ref_metrics):
        assert got.keys() == ref.keys()
        for key in ("loss", "mean_skipped_layers", "threshold", "top1_agreement", "lambda"):
            if key not in ref:  # lambda: the penalty budget only
                continue
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (got["step"], key)
    assert metrics[2]["heldout"]["kl"] == pytest.approx(ref_metrics[2]["heldout"]["kl"], rel=1e-4, abs=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kl"] == pytest.approx(ref_summary["kl"], rel=1e-4, abs=1e-6)
    # FSDP: each rank holds about half of the layers' weights (the small norms stay replicated); DDP: all of them.
    assert summary["base_share_held"] == (pytest.approx(0.5, abs=0.02) if fsdp else 1.0)


def test_global_batch_is_cut_into_contiguous_equal_shards():
    batch = torch.arange(8).view(8, 1)
    shards = [distributed.shard_rows(batch, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(shards), batch)
    assert [s.shape[0] for s in shards] == [2, 2, 2, 2]
    with pytest.raises(BadInput, match="does not split evenly"):
        distributed.DistContext(world_size=3).check_batch(4)


def test_single_process_is_a_no_op():
    ctx = distributed.DistContext()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert ctx.mean([1.0, 2.0]) == [1.0, 2.0]
    batch = torch.arange(4).view(4, 1)
    assert torch.equal(ctx.shard(batch), batch)


def test_fsdp_without_a_launcher_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "_CURRENT", None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("FLEXI_FSDP", "1")
    with pytest.raises(BadInput, match="needs a launcher"):
        distributed.init()


def base_share_held(fm) -> float:
    """The share of the decoder layers' frozen weights this rank holds (FSDP shards are DTensors)."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    trainable = {id(p) for p in fm.trainable_parameters()}
    for p in fm.model.model.layers.parameters():
        if id(p) not in trainable:
            total += p.numel()
            held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held / total


if __name__ == "__main__":  # one rank under torchrun: data parallel, then FSDP (same process group)
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist = distributed.init("cpu")
    for mode in ("ddp", "fsdp"):
        dist.fsdp = mode == "fsdp"  # what FLEXI_FSDP=1 / ACCELERATE_USE_FSDP=true set at init
        out = Path(sys.argv[1]) / mode
        fm, summary = run(out / "ckpt", BUDGET[mode])
        save_file({k: v.contiguous() for k, v in fm.flexi_state_dict().items()}, out / f"rank{dist.rank}.safetensors")
        if dist.is_main:
            (out / "summary.json").write_text(json.dumps({**summary, "base_share_held": base_share_held(fm)}))
