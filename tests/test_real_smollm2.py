"""Real tier: the embedded SmolLM2-135M-Instruct, converted, behaves exactly like the original."""

import copy

import pytest
import torch

from flexicli.core.flexi_model import FlexiModel

pytestmark = pytest.mark.real

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


def chat_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def test_converted_greedy_generation_is_identical(smollm2, tmp_path):
    model, tok, info = smollm2
    fm = FlexiModel.wrap(copy.deepcopy(model), tok, base_model=info.base_model)
    assert fm.config.routed_layers == list(range(2, 30))  # every layer but the first two
    for prompt in CHAT_PROMPTS:
        x = chat_ids(tok, prompt)
        kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        with torch.no_grad():
            ref = model.generate(x, **kw)
            with fm.record() as rec:
                got = fm.model.generate(x, **kw)
        assert torch.equal(ref, got), prompt
        assert rec.decisions().all()
    # round trip through a real checkpoint folder: small, and the same logits
    fm.save(tmp_path / "ckpt")
    size = sum(p.stat().st_size for p in (tmp_path / "ckpt").iterdir())
    assert size < 4 * sum(p.numel() for p in fm.trainable_parameters()) + 1e6  # routers and adapters, not the base
    loaded = FlexiModel.load(tmp_path / "ckpt")
    x = chat_ids(tok, CHAT_PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, fm.model(x).logits)
        assert (loaded.model(x).logits - model(x).logits).abs().max() <= 1e-5
