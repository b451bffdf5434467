"""A tiny model that can talk: a word-level tokenizer for the tiny random models (vocab 128, with a chat
template), and a tiny checkpoint whose routers are planted so that tokens really differ in the layers they run."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_config

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3; the tiny configs use eos 2
WORDS = ["user", "assistant", ":", "."] + [f"w{i}" for i in range(120)]  # ids 4..127
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
NUM_LAYERS, ROUTED = 4, [2, 3]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=TEMPLATE)


def tiny_talking_model(seed: int = 0):
    """A 4-layer tiny llama (hidden 64) with random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = NUM_LAYERS
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def plant_routers(fm, seed: int = 0, scale: float = 40.0) -> None:
    """Routers that decide differently for different tokens, with gates far from the threshold (so the
    decisions cannot flip between a cached decode step and a full forward through float noise): bias 0 and
    large head weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fm.layers:
            router = layer.router
            router.bias.zero_()
            # every weight from `seed`: the decisions must not depend on how the checkpoint drew its routers
            hidden = router.head.weight.shape[1]
            for w in (router.enc.weight, router.dec.weight):  # at Router's own initial scale
                w.copy_(torch.randn(w.shape, generator=g) / hidden ** 0.5)
            w = router.head.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A base model folder (weights + tokenizer) and a flexicli checkpoint on it with planted routers.
    Returns the checkpoint folder."""
    from flexicli.convert import convert

    base = folder / "tiny-base"
    tiny_talking_model(seed).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    fm = convert(str(base), folder / "tiny-ckpt", layers=",".join(map(str, ROUTED)))
    plant_routers(fm, seed)
    return fm.save(folder / "tiny-ckpt", overwrite=True)
