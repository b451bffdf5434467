"""Prompt text for a tokenizer without a chat template: the BOS token must be there when the tokenizer adds one
(Gemma-3-270m, a base model, generated "<h2><h2><h2>..." for every self-generated answer without it)."""

from __future__ import annotations

import pytest

from flexicli.data.text import chat_text, pack

VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>", "Tell", "me", "about", "tea."]


def base_tokenizer(adds_bos: bool):
    """A word-level tokenizer with no chat template that (like Gemma's) puts <bos> before plain text, or not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_chat_text_without_template_keeps_the_tokenizers_bos(adds_bos):
    tok = base_tokenizer(adds_bos)
    assert not tok.chat_template
    text = chat_text(tok, [{"role": "user", "content": "Tell me about tea."}], add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]  # how teacher_answers and pack tokenise it
    assert ids == ([2] if adds_bos else []) + [4, 5, 6, 7]
    packed = pack(tok, [chat_text(tok, [{"role": "user", "content": "Tell me"}])], seq_len=2)
    assert packed.tolist() == ([[2, 4], [5, 1]] if adds_bos else [[4, 5]])
