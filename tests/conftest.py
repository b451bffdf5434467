"""Shared fixtures: tiny random models for every family (fast tier) and the real SmolLM2 (real tier)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# As `flexi` does before transformers is imported (read once, at import): in-process CLI tests then see the stderr
# a user sees, without the "Loading weights" bar.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marker must be there when it reads them
def pytest_collection_modifyitems(items):
    """A test that loads the real SmolLM2 belongs to the real tier, marked or not: the tiny tier (`-m "not real"`, as
    scripts/check_newest.sh runs it) must not need the embedded model (four such tests were unmarked until
    2026-12-06)."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(family: str):
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig, "phi3": tf.Phi3Config,
           "olmo2": tf.Olmo2Config}[family]
    extra = {"head_dim": 16} if family in ("gemma2", "gemma3_text", "qwen3") else {}
    if family in ("gemma2", "gemma3_text"):
        extra["sliding_window"] = 8  # small, so the test sequences cross it
    return cls(**TINY, **extra, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_pair():
    """(original, converted) tiny llama with identical weights; the converted one routes layer 1."""
    from flexicli.core.flexi_model import FlexiModel

    def make(family="llama", routed=None, **kw):
        original = tiny_model(family)
        fm = FlexiModel.wrap(copy.deepcopy(original), routed_layers=routed, base_model="tiny", **kw)
        return original, fm

    return make


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny llama saved as a Hugging Face folder (no tokenizer), as `flexi convert` takes it."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (embedded GGUF, dequantised once and cached)."""
    from flexicli.core.base_model import load_base

    model, tok, info = load_base(None, dtype="float32", device="cpu")
    return model, tok, info
