"""Text -> token ids, and the special ids decoding needs: one home for what eval, train and generate all do.

A prompt goes through the chat template when the tokenizer has one (as the user's message, with the assistant's
turn opened); plain text gets the tokenizer's special tokens unless it already starts with BOS; token ids pass
through as they are (a model without a tokenizer is driven by ids)."""

from __future__ import annotations

import torch

from ..core.errors import BadInput


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation through the chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("the tokenizer has no chat template", "pass a PROMPT with --raw")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, item, chat: bool | None = None) -> list[int]:
    """`item` as token ids: a str as the user's message through the chat template (chat=True, or chat=None and the
    tokenizer has a template) or as plain text to continue (chat=False, or no template); ids as they are."""
    if not isinstance(item, str):
        return [int(t) for t in (item.tolist() if torch.is_tensor(item) else item)]
    if tokenizer is None:
        raise BadInput("this model has no tokenizer, so it cannot read text", "pass token ids from Python")
    if chat is not False and getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": item}])
    # chat-templated text already carries the BOS token (if the model uses one); plain text gets it here
    has_bos = bool(getattr(tokenizer, "bos_token", None)) and item.startswith(tokenizer.bos_token)
    return list(tokenizer(item, add_special_tokens=not has_bos)["input_ids"])


def scored_sequences(tokenizer, texts, seq_len: int) -> list[list[int]]:
    """Texts as `flexi eval` scores them, teacher-forced: each alone as plain text (prompt_ids, chat=False), cut at
    seq_len, those of at least 2 tokens (one prediction). `flexi train` reads its held-out and validation text the
    same way (text.one_per_row), so its calibrated threshold holds on the verdict's count."""
    seqs = (prompt_ids(tokenizer, t, chat=False)[:seq_len] for t in texts)
    return [s for s in seqs if len(s) >= 2]


def stop_ids(model, tokenizer) -> set[int]:
    """Every id that ends generation: the eos ids of the tokenizer, the generation config and the model config."""
    ids = set()
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def pad_id(model, tokenizer) -> int:
    """The id that pads batched prompts (left) and finished rows: pad, else eos, else the config's, else 0."""
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                getattr(model.config, "pad_token_id", None)):
        if isinstance(pad, int):
            return pad
    return 0


def answer_header(tokenizer) -> tuple[list[int], set[int]]:
    """(the ids that open the assistant's turn in the chat template, the ids that end a turn): what locates an answer
    in token rows (train.objectives.answer_weights). Taken as the ids the generation prompt adds to a user turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadInput("answer weighting needs a tokenizer with a chat template (it finds answers by the assistant's "
                       "turn)", "set answer_weight: 0")
    user = [{"role": "user", "content": "x"}]
    opened = chat_ids(tokenizer, user)
    closed = list(tokenizer(tokenizer.apply_chat_template(user, tokenize=False), add_special_tokens=False)["input_ids"])
    if len(opened) <= len(closed) or opened[:len(closed)] != closed:
        raise BadInput("cannot find the assistant's turn in this chat template", "set answer_weight: 0")
    header = opened[len(closed):]
    ends = {header[0]} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    return header, ends
