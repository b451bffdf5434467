"""GPU decode engine: equal to the reference path on a tiny fp32 Llama (runs only where CUDA and Triton are)."""


import pytest
import torch

from conftest import tiny_model
from flexicli.core.flexi_model import FlexiModel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_engine_refuses_what_it_does_not_cover():
    from flexicli.speed.gpu_engine import engine_available

    fm = FlexiModel.wrap(tiny_model("llama"), routed_layers=[1], base_model="tiny")
    assert engine_available(fm) == "not on a CUDA device"


@cuda
def test_engine_matches_reference_and_records_decisions():
    from flexicli.speed.gpu_engine import DecodeEngine, engine_available

    model = tiny_model("llama").to("cuda")
    fm = FlexiModel.wrap(model, routed_layers=[0, 1], base_model="tiny")
    assert engine_available(fm) is None
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in fm.layers:
            layer.router.head.weight.normal_(std=2.0)
            layer.router.bias.zero_()
            layer.adapter.down_proj.weight.normal_(std=0.1)
    ids = torch.randint(3, 128, (1, 12), device="cuda")
    fm.state.fast_path = False
    with torch.no_grad(), fm.record() as rec:
        ref = model(ids).logits[0]
    engine = DecodeEngine(model, fm, max_len=32)
    logits, flags = engine.graph("routed").prefill(ids, keep_logits=True)
    assert torch.equal(flags[:, [0, 1]].bool().cpu(), rec.decisions()[0])
    assert rec.decisions().any() and not rec.decisions().all()
    assert (logits - ref).abs().max().item() < 1e-4

    with torch.no_grad(), fm.record() as rec:
        hf = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 12:]
    engine = DecodeEngine(model, fm, max_len=ids.shape[1] + 7)  # greedy decoding on the engine, as flexi bench runs it
    engine.threshold = fm.state.threshold
    g = engine.graph("routed")
    _, prompt_flags = g.prefill(ids, keep_logits=True)
    tokens, flags = g.generate(6, record=True)
    tokens, decisions = tokens.cpu(), torch.cat([prompt_flags[:, engine.routed_layers].bool(), flags[:-1]]).cpu()
    assert torch.equal(tokens, hf.cpu()) and torch.equal(decisions, rec.decisions()[0])


@cuda
def test_bench_on_cuda_reports_the_engine():
    from flexicli.speed.bench import run_bench

    fm = FlexiModel.wrap(tiny_model("llama").to("cuda"), routed_layers=[0, 1], base_model="tiny")
    r = run_bench(fm, skip=1, prefill_len=16, decode_prompt=4, new_tokens=4, repeats=1)
    engine = r["engine"]
    assert isinstance(engine, dict), engine
    assert set(engine["decode_tokens_per_s"]) == {"full", "routed", "fixed"}
    assert engine["routed_over_full"] > 0 and engine["full_over_hf_original"] > 0
