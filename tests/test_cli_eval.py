"""`flexi eval` through the real CLI on a tiny llama with a character-level tokenizer: verdict, exit code,
--json, the result stored in the checkpoint, and one clear line for bad input."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_model
from flexicli.core.checkpoint import CARD_FILE, WEIGHTS_FILE, read_config
from flexicli.core.flexi_model import FlexiModel
from test_evaluate import damage

SMALL = ["--max-samples", "4", "--seq-len", "48", "--prompts", "2", "--new-tokens", "6", "--tasks-per-category", "1"]
TEXTS = ["The museum opens at nine and closes at five.", "Rain is expected in the northern valleys tomorrow.",
         "She packed two books, a lamp and a small green notebook.", "Our train left the station late."]


def char_tokenizer():
    """A character-level tokenizer (100 ids, fits the tiny model's 128) with a minimal chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}> {% endif %}")
    return tok


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXI_CACHE", str(tmp_path / "cache"))
    from flexicli.convert import convert

    base = tmp_path / "tiny-base"
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    convert(str(base), tmp_path / "ckpt", device="cpu")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return tmp_path / "ckpt"


def flexi(*args, cwd=None):
    """The real process: exit code, stdout and stderr exactly as a user sees them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLEXI_CACHE": str(cwd or "/nonexistent")}
    return subprocess.run([sys.executable, "-m", "flexicli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def flexi_here(*args):
    """The same CLI in this process (no interpreter start-up): returncode, stdout, stderr like `flexi`."""
    from click.testing import CliRunner
    from transformers.utils import logging

    from flexicli.cli import main

    logging.disable_progress_bar()  # `flexi` turns them off before transformers is imported; here it is too late
    r = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_exact_conversion_passes_and_is_stored(checkpoint):
    r = flexi("eval", "-m", str(checkpoint), "--data", str(checkpoint.parent / "data.jsonl"), *SMALL, "--json",
              cwd=checkpoint.parent)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout is one JSON object and nothing else
    for key in ("passed", "kl", "kl_p99", "top1_agreement", "greedy_match", "mean_skipped_layers",
                "per_layer_skip_rate", "retention"):
        assert key in result
    assert result["passed"] is True and result["kl"] == 0.0 and result["top1_agreement"] == 1.0
    assert result["greedy_match"] == 1.0 and result["greedy_first_divergence"] == 6  # = --new-tokens
    assert result["per_layer_skip_rate"] == {"1": 0.0}
    assert len(result["task_scores"]) == 7  # the suite ran (a random model scores ~0: retention undefined)
    assert result["task_flips"] == {"items": 7, "correct_to_wrong": 0.0, "wrong_to_correct": 0.0, "flips": 0.0}
    assert result["kl_p99"] == 0.0 and "yardstick" not in result  # --yardstick is off by default
    stored = read_config(checkpoint).eval
    assert stored["passed"] is True and stored["kl"] == 0.0 and stored["data"].endswith("data.jsonl")
    assert stored["kl_p99"] == 0.0 and stored["failed_checks"] == []
    assert stored["weights_sha256"] == hashlib.sha256((checkpoint / WEIGHTS_FILE).read_bytes()).hexdigest()
    card = (checkpoint / CARD_FILE).read_text()
    assert "Verdict: **passed**" in card and "| top1_agreement | 1 |" in card and "| kl_p99 | 0 |" in card


def test_damaged_checkpoint_fails_with_exit_code_1(checkpoint):
    fm = FlexiModel.load(checkpoint, device="cpu")
    damage(fm)
    fm.save(checkpoint, overwrite=True)
    r = flexi_here("eval", "-m", str(checkpoint), "--data", str(checkpoint.parent / "data.jsonl"), *SMALL)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "FAILED" in r.stdout and "top1_agreement" in r.stdout and "KL 99th percentile" in r.stdout
    assert "teacher forcing" in r.stderr  # the progress bar goes to stderr
    stored = read_config(checkpoint).eval
    assert stored["passed"] is False and stored["mean_skipped_layers"] == 1.0
    assert any(c.startswith("top1_agreement ") for c in stored["failed_checks"])
    assert "Verdict: **failed** (" in (checkpoint / CARD_FILE).read_text()


def test_yardstick_places_the_routed_model(checkpoint, capsys):
    fm = FlexiModel.load(checkpoint, device="cpu")
    damage(fm)
    fm.save(checkpoint, overwrite=True)
    args = ["eval", "-m", str(checkpoint), "--data", str(checkpoint.parent / "data.jsonl"), *SMALL, "--prompts", "0",
            "--tasks-per-category", "0", "--yardstick"]
    r = flexi_here(*args, "--json")
    result = json.loads(r.stdout)
    ys = result["yardstick"]
    assert set(ys) == {"int8", "int4"} and ys["int8"]["kl"] < ys["int4"]["kl"]
    assert result["yardstick_place"] in ("closer than int8", "between int8 and int4", "further than int4")
    assert read_config(checkpoint).eval["yardstick"] == ys
    card = (checkpoint / CARD_FILE).read_text()
    assert "| yardstick.int4.kl_p99 |" in card and f"| yardstick_place | {result['yardstick_place']} |" in card
    printed = flexi_here(*args, "--no-save").stdout
    assert f"yardstick: routed KL {result['kl']:.4g} is {result['yardstick_place']} (int8: KL" in printed
    # with the task suite the copies have a retention too (the tiny model scores 0: set here), printed beside the
    # routed model's
    from flexicli.cli.eval import _print_report

    capsys.readouterr()
    _print_report({**result, "retention": 0.6, "yardstick": {"int8": {**ys["int8"], "retention": 0.86},
                                                             "int4": {**ys["int4"], "retention": 0.79}}})
    assert "yardstick: task retention routed 0.6, int8 copy 0.86, int4 g32 copy 0.79" in capsys.readouterr().out
    _print_report({**result, "retention": 0.6, "retention_interval": [0.5, 0.7],
                   "yardstick": {"int8": {**ys["int8"], "retention": 0.86, "retention_interval": [0.8, 0.9]},
                                 "int4": {**ys["int4"], "retention": 0.79, "retention_interval": None}}})
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps at the console's width
    assert ("yardstick: task retention routed 0.6 (5-95%: 0.5-0.7), int8 copy 0.86 (5-95%: 0.8-0.9), int4 g32 copy "
            "0.79 skip rate") in printed


def test_thresholds_are_overridable(checkpoint):
    fm = FlexiModel.load(checkpoint, device="cpu")
    damage(fm)
    fm.save(checkpoint, overwrite=True)
    r = flexi_here("eval", "-m", str(checkpoint), "--data", str(checkpoint.parent / "data.jsonl"), *SMALL, "--json",
                   "--min-top1", "off", "--max-kl", "100", "--no-save")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["thresholds"]["min_top1"] is None
    assert read_config(checkpoint).eval is None  # --no-save


def one_error_line(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_bad_input(checkpoint, tmp_path):
    line = one_error_line(flexi_here("eval", "-m", str(checkpoint), "--data", str(tmp_path / "x.jsonl")))
    assert "no such data file" in line
    assert "no checkpoint folder" in one_error_line(flexi_here("eval", "-m", str(tmp_path / "nothing")))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    line = one_error_line(flexi_here("eval", "-m", str(checkpoint), "--data", str(tmp_path / "bad.jsonl")))
    assert "bad.jsonl:2" in line
    assert read_config(checkpoint).eval is None  # nothing half-written


def test_default_heldout_data(checkpoint, monkeypatch):
    """No --data: the built-in held-out conversations. Their answers (the original model's own, generated once
    and cached by flexicli.data.text) are stubbed here: generating 42 of them is the slow part and is data's to test."""
    import flexicli.data.text

    asked = []

    def answers(fm, prompts, progress=None, **kw):
        asked.extend(prompts)
        return ["Fine, thanks."] * len(prompts)

    monkeypatch.setattr(flexicli.data.text, "teacher_answers", answers)
    r = flexi_here("eval", "-m", str(checkpoint), "--max-samples", "3", "--prompts", "1", "--new-tokens", "4",
                   "--tasks-per-category", "0", "--json", "--no-save")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["texts"] == 3 and result["data"] == "built-in held-out" and result["passed"] is True
    assert asked == flexicli.data.text.heldout_prompts()  # all of them: the cache key `flexi train` uses too


def test_cli_threshold_defaults_are_the_library_defaults():
    from dataclasses import asdict

    from flexicli.cli.eval import _DEFAULTS
    from flexicli.evaluation.evaluate import Thresholds

    assert _DEFAULTS == asdict(Thresholds())


def test_static_skip_layers_is_reported_not_stored(checkpoint):
    r = flexi_here("eval", "-m", str(checkpoint), "--data", str(checkpoint.parent / "data.jsonl"), *SMALL, "--json",
                   "--skip-layers", "1")
    result = json.loads(r.stdout)
    assert result["routing"] == {"mode": "fixed", "skip_layers": [1]} and result["per_layer_skip_rate"] == {"1": 1.0}
    assert read_config(checkpoint).eval is None
    assert "not routed" in one_error_line(flexi_here("eval", "-m", str(checkpoint), "--skip-layers", "0"))
