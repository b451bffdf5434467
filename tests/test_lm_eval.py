"""flexicli.evaluation.lm_eval and `flexi eval --lm-eval-tasks` against the real lm-evaluation-harness, offline: the local
tasks in tests/lm_eval_tasks (a multiple-choice and a generation task, JSON data beside the YAML). The harness's
scores of the original and of the routed model are checked against the tests' own computation with the same
weights: each choice's loglikelihood and the argmax for multiple choice, a greedy decode and exact match for
generation. The checkpoints skip layers (routers that skip everything in the tiny tier, some layers for SmolLM2),
so a wrapper that routed wrong (say, always the original model) gives the wrong numbers."""

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from flexicli.evaluation import lm_eval as flexi_lm_eval
from flexicli.core.errors import BadInput
from flexicli.core.flexi_model import FlexiModel

pytest.importorskip("lm_eval")  # the lm-eval extra (scripts/setup.sh installs it)

TASKS = Path(__file__).parent / "lm_eval_tasks"
MODES = {"original": {"mode": "full"}, "routed": {"mode": "routed"}}


def rows(name):
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


# ---- the independent computation ----------------------------------------------------------------------------
def choice_loglikelihoods(fm, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context) summed over the choice's tokens, one forward pass per choice."""
    tok, out = fm.tokenizer, []
    ctx = tok(context)["input_ids"]
    for choice in choices:
        whole = tok(context + " " + choice)["input_ids"]
        assert whole[:len(ctx)] == ctx  # the choice's tokens are what follows the context's
        with torch.no_grad():
            logp = torch.log_softmax(fm.model(torch.tensor([whole])).logits[0].double(), -1)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    return out


def multiple_choice(fm, items, mode) -> list[list[float]]:
    with fm.routing(**mode):
        return [choice_loglikelihoods(fm, f"Question: {d['question']}\nAnswer:", d["choices"]) for d in items]


def greedy_answers(fm, items, mode, new_tokens=8, stop=("\n", ".", ",")) -> list[str]:
    """Greedy decode, cut at the first stop string, whitespace stripped (flexi_gen.yaml's settings)."""
    out = []
    with fm.routing(**mode), torch.no_grad():
        for d in items:
            ids = torch.tensor([fm.tokenizer(d["prompt"])["input_ids"]])
            gen = fm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=fm.tokenizer.pad_token_id or 0)
            text = fm.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0]
            out.append(text.strip())
    return out


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def check_against_independent(fm, result, n_mc, n_gen):
    """The harness's per-item numbers and aggregate scores are the independent ones, for both models; returns
    the independent predictions {mode: [choice index]} and answers {mode: [text]}."""
    mc, gen = rows("mc.jsonl")[:n_mc], rows("gen.jsonl")[:n_gen]
    preds, texts = {}, {}
    for name, mode in MODES.items():
        lls = multiple_choice(fm, mc, mode)
        preds[name] = [argmax(x) for x in lls]
        samples = sorted(result["raw"][name]["samples"]["flexi_mc"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(n_mc))
        for s, mine in zip(samples, lls):
            assert [r[0] for r in s["filtered_resps"]] == pytest.approx(mine, rel=1e-4, abs=1e-4)
        acc = sum(p == d["answer"] for p, d in zip(preds[name], mc)) / n_mc
        assert result["tasks"]["flexi_mc"]["metrics"]["acc"][name] == acc  # exactly

        texts[name] = greedy_answers(fm, gen, mode)
        samples = sorted(result["raw"][name]["samples"]["flexi_gen"], key=lambda s: s["doc_id"])
        assert [s["filtered_resps"][0] for s in samples] == texts[name]
        em = sum(t == d["answer"] for t, d in zip(texts[name], gen)) / n_gen
        assert result["tasks"]["flexi_gen"]["metrics"]["exact_match,strip"][name] == em
    return preds, texts


def expected_flips(orig_ok: list[bool], routed_ok: list[bool]) -> dict:
    n = len(orig_ok)
    lost = sum(a and not b for a, b in zip(orig_ok, routed_ok))
    gained = sum(b and not a for a, b in zip(orig_ok, routed_ok))
    return {"items": n, "correct_to_wrong": lost / n, "wrong_to_correct": gained / n, "flips": (lost + gained) / n}


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A converted tiny llama (character tokenizer) whose router skips its routed layer for every token."""
    from flexicli.convert import convert
    from test_cli_eval import char_tokenizer
    from test_evaluate import damage

    monkeypatch.setenv("FLEXI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # relative data_files must be read relative to the YAML, not the cwd
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    convert(str(base), tmp_path / "ckpt", device="cpu")
    fm = FlexiModel.load(tmp_path / "ckpt", device="cpu")
    damage(fm)
    fm.save(tmp_path / "ckpt", overwrite=True)
    return tmp_path / "ckpt"


# ---- the tiny tier -------------------------------------------------------------------------------------------
def test_harness_scores_are_the_independently_computed_ones(checkpoint):
    fm = FlexiModel.load(checkpoint, device="cpu")
    result = flexi_lm_eval.compare(fm, ["flexi_mc", "flexi_gen"], include=[str(TASKS)], batch_size=4)
    preds, texts = check_against_independent(fm, result, n_mc=24, n_gen=12)
    # The test can fail: the routed model is not the original here (routing ignored would give the same numbers).
    assert preds["original"] != preds["routed"] and texts["original"] != texts["routed"]
    assert fm.state.mode == "routed"  # compare() leaves the routing as it found it
    mc = rows("mc.jsonl")
    ok = {k: [p == d["answer"] for p, d in zip(v, mc)] for k, v in preds.items()}
    assert result["tasks"]["flexi_mc"]["flip_metric"] == "acc"
    assert result["tasks"]["flexi_mc"]["flips"] == expected_flips(ok["original"], ok["routed"])
    assert result["lm_eval_version"] == __import__("lm_eval").__version__


def test_flips_in_both_directions(checkpoint, tmp_path):
    """An answer key made from the independent predictions: the original's choice on even items, the routed
    model's on odd ones. Where they disagree, even items flip correct -> wrong and odd ones wrong -> correct."""
    fm = FlexiModel.load(checkpoint, device="cpu")
    mc = rows("mc.jsonl")
    preds = {k: [argmax(x) for x in multiple_choice(fm, mc, mode)] for k, mode in MODES.items()}
    key = [preds["original" if i % 2 == 0 else "routed"][i] for i in range(len(mc))]
    tasks = tmp_path / "keyed"
    tasks.mkdir()
    shutil.copy(TASKS / "flexi_mc.yaml", tasks / "flexi_mc.yaml")
    (tasks / "mc.jsonl").write_text("".join(json.dumps({**d, "answer": a}) + "\n" for d, a in zip(mc, key)))
    result = flexi_lm_eval.compare(fm, ["flexi_mc"], include=[str(tasks)])
    differ = [a != b for a, b in zip(preds["original"], preds["routed"])]
    flips = result["tasks"]["flexi_mc"]["flips"]
    n = len(mc)
    assert flips["correct_to_wrong"] == sum(differ[0::2]) / n > 0
    assert flips["wrong_to_correct"] == sum(differ[1::2]) / n > 0
    acc = result["tasks"]["flexi_mc"]["metrics"]["acc"]
    assert acc["original"] == 1 - sum(differ[1::2]) / n and acc["routed"] == 1 - sum(differ[0::2]) / n
    assert acc["retention"] == pytest.approx(acc["routed"] / acc["original"])


def test_flexi_eval_stores_lm_eval_in_config_and_card(checkpoint):
    from flexicli.core.checkpoint import CARD_FILE, read_config
    from test_cli_eval import SMALL, TEXTS, flexi_here

    data = checkpoint.parent / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    r = flexi_here("eval", "-m", str(checkpoint), "--data", str(data), *SMALL, "--lm-eval-tasks", "flexi_mc,flexi_gen",
                   "--lm-eval-include", str(TASKS), "--lm-eval-limit", "5", "--json")
    assert r.returncode == 1, r.stderr  # the damaged checkpoint fails flexi eval's own verdict
    result = json.loads(r.stdout)
    assert set(result["lm_eval"]["tasks"]) == {"flexi_mc", "flexi_gen"} and result["lm_eval"]["limit"] == 5
    assert result["lm_eval"]["tasks"]["flexi_mc"]["flips"]["items"] == 5
    assert result["task_flips"]["items"] == 7  # the built-in suite's flips, one item per category
    stored = read_config(checkpoint).eval
    assert stored["lm_eval"] == result["lm_eval"] and stored["task_flips"] == result["task_flips"]
    card = (checkpoint / CARD_FILE).read_text()
    acc = result["lm_eval"]["tasks"]["flexi_mc"]["metrics"]["acc"]
    assert f"| flexi_mc | acc | {acc['original']:.4g} | {acc['routed']:.4g} |" in card
    # a later run without lm-eval tasks, on the same weights, keeps them; the human report shows them
    r = flexi_here("eval", "-m", str(checkpoint), "--data", str(data), *SMALL)
    assert read_config(checkpoint).eval["lm_eval"] == result["lm_eval"] and "| flexi_mc | acc |" in (
        checkpoint / CARD_FILE).read_text()
    r = flexi_here("eval", "-m", str(checkpoint), "--data", str(data), *SMALL, "--lm-eval-tasks", "flexi_mc",
                   "--lm-eval-include", str(TASKS), "--lm-eval-limit", "2", "--no-save")
    assert "lm-evaluation-harness" in r.stdout and "flexi_mc" in r.stdout and "task suite flips" in r.stdout


def test_bad_input_is_one_line(checkpoint, tmp_path, monkeypatch):
    from test_cli_eval import flexi_here, one_error_line

    line = one_error_line(flexi_here("eval", "-m", str(checkpoint), "--lm-eval-tasks", "no_such_task_xyz"))
    assert "unknown lm-eval task no_such_task_xyz" in line
    line = one_error_line(flexi_here("eval", "-m", str(checkpoint), "--lm-eval-tasks", "flexi_mc",
                                     "--lm-eval-include", str(tmp_path / "nowhere")))
    assert "no such task folder" in line
    line = one_error_line(flexi_here("eval", "-m", str(checkpoint), "--lm-eval-limit", "5"))
    assert "no lm-eval task named" in line
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # as if the extra were not installed
    line = one_error_line(flexi_here("eval", "-m", str(checkpoint), "--lm-eval-tasks", "flexi_mc"))
    assert "lm-evaluation-harness is not installed" in line and "flexicli[lm-eval]" in line
    with pytest.raises(BadInput, match="not installed"):
        flexi_lm_eval.flexi_lm(str(checkpoint))


def test_flexi_lm_and_register(checkpoint):
    import lm_eval
    from lm_eval.api.registry import get_model

    lm = flexi_lm_eval.flexi_lm(str(checkpoint), routing="full", threshold=0.7, batch_size=4)
    assert lm.model is lm.flexi.model and lm.flexi.state.mode == "full" and lm.flexi.state.threshold == 0.7
    with pytest.raises(BadInput, match="routing"):
        flexi_lm_eval.flexi_lm(str(checkpoint), routing="sideways")
    cls = flexi_lm_eval.register()
    assert get_model("flexi") is cls
    tm, specs = flexi_lm_eval.task_specs(["flexi_mc"], [str(TASKS)])[1:]
    by_name = lm_eval.simple_evaluate(model="flexi", model_args=f"pretrained={checkpoint},routing=full",
                                      tasks=specs, task_manager=tm, limit=3)
    direct = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=tm, limit=3)
    assert by_name["results"]["flexi_mc"]["acc,none"] == direct["results"]["flexi_mc"]["acc,none"]


# ---- the real tier: SmolLM2 ----------------------------------------------------------------------------------
@pytest.mark.real
def test_real_smollm2_exact_and_skipping(smollm2, tmp_path, monkeypatch):
    """A fresh conversion routes nothing: both models score the same, retention 1, no flips. With the routers of
    the last 4 routed layers pushed to skip every token, the harness's routed scores are still the test's own."""
    model, tok, info = smollm2
    monkeypatch.chdir(tmp_path)
    fm = FlexiModel.wrap(copy.deepcopy(model), tok, base_model=info.base_model)
    result = flexi_lm_eval.compare(fm, ["flexi_mc", "flexi_gen"], include=[str(TASKS)], limit=12, batch_size=4)
    acc = result["tasks"]["flexi_mc"]["metrics"]["acc"]
    assert acc["original"] == acc["routed"] > 0.25 and acc["retention"] == 1.0
    assert result["tasks"]["flexi_mc"]["flips"]["flips"] == 0.0
    assert result["tasks"]["flexi_gen"]["metrics"]["exact_match,strip"]["original"] > 0

    with torch.no_grad():
        for layer in fm.layers[-4:]:
            layer.router.bias.fill_(-20.0)
    result = flexi_lm_eval.compare(fm, ["flexi_mc", "flexi_gen"], include=[str(TASKS)], limit=12, batch_size=4)
    preds, texts = check_against_independent(fm, result, n_mc=12, n_gen=12)
    assert preds["original"] != preds["routed"] or texts["original"] != texts["routed"]
