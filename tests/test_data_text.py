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
    assert packed.tolist() == ([[2, 4], [5, 1]] if adds_bos else [[4, 5], [1, 4]])


DOCS = ["Returns the number of elements held in this container right now. Larger containers take longer to scan, "
        "and the count is exact. It never changes the container and is safe to call from several threads at once, "
        "which matters when a scheduler polls many of them.\n\nArgs: more text.",
        "Build a new parser object from the given settings file. The parser keeps the file open until it is closed."]


def test_task_prompts_follow_the_suite_formats_without_its_items():
    from flexicli.data.tasks import load_tasks
    from flexicli.data.text import task_prompts

    prompts = task_prompts(30, docs=DOCS)
    assert len(prompts) == len(set(prompts)) == 30 and prompts == task_prompts(30, docs=DOCS)
    assert not set(prompts) & {t.prompt for t in load_tasks()}, "no suite item is trained on"
    starts = ("Repeat this sentence exactly", "Write the word", "Summarise in one sentence", "Continue this text",
              "What is")
    assert all(p.startswith(starts) for p in prompts) and all(any(p.startswith(s) for p in prompts) for s in starts)
    assert any("Returns the number of elements held in this container right now." in p for p in prompts)
    for p in prompts:
        if p.startswith("What is"):
            a, op, b = p.split("?")[0].split()[-3:]
            assert (int(a) >= 10) if op == "+" else (int(a) > 12), "sums and products outside the suite's ranges"
    assert task_prompts(0, docs=DOCS) == []


def test_task_prompts_need_data_the_original_answers():
    from flexicli.core.errors import BadInput
    from flexicli.train.config import TrainConfig

    with pytest.raises(BadInput, match="task_prompts"):
        TrainConfig(skip_target=1, data="docs", task_prompts=10).check()
    with pytest.raises(BadInput, match="at least 0"):
        TrainConfig(skip_target=1, task_prompts=-1).check()


def test_fact_prompts_ask_for_recall_without_the_suites_items():
    from flexicli.core.errors import BadInput
    from flexicli.data.tasks import load_tasks
    from flexicli.data.text import fact_prompts

    prompts = fact_prompts(200)
    assert len(prompts) == len(set(prompts)) == 200 and prompts == fact_prompts(200) != fact_prompts(200, seed=1)
    assert all(p.endswith("? Answer in a few words.") for p in prompts), "the suite's answer format"
    suite = {t.prompt for t in load_tasks()}
    assert not set(fact_prompts(236)) & suite, "no suite item is trained on"
    assert {"What is the capital of France? Answer in a few words.", "What colour is snow? Answer in a few words."} \
        <= suite, "the check above compares the same rendering"
    assert fact_prompts(0) == []
    with pytest.raises(BadInput, match="more than the 236"):
        fact_prompts(237)


def test_fact_prompts_need_data_the_original_answers():
    from flexicli.core.errors import BadInput
    from flexicli.train.config import TrainConfig

    with pytest.raises(BadInput, match="fact_prompts"):
        TrainConfig(skip_target=1, data="docs", fact_prompts=10).check()
    with pytest.raises(BadInput, match="at least 0"):
        TrainConfig(skip_target=1, fact_prompts=-1).check()
    with pytest.raises(BadInput, match="more than the 236"):
        TrainConfig(skip_target=1, fact_prompts=237).check()


def test_pack_begins_rows_at_text_starts_and_loses_no_token():
    from flexicli.core.errors import BadInput

    items = [[1] * 5, [2] * 7, [3] * 3, [4] * 14, [5] * 6]  # token ids: no tokenizer needed
    rows = pack(None, items, seq_len=10).tolist()
    # [4]*14 fills a row of its own, its last 4 go on like a text; the others go where they first fit
    assert rows == [[1] * 5 + [3] * 3 + [2] * 2, [2] * 7 + [4] * 3, [4] * 10, [4] * 4 + [5] * 6]
    for item in items:  # every token of every item is there
        assert sum(r.count(item[0]) for r in rows) >= len(item)
    with pytest.raises(BadInput, match="not enough text"):
        pack(None, [[1] * 4], seq_len=10)
