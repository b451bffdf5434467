"""flexi patterns: every output is written, agrees with the recorded tokens, and the HTML fetches nothing."""

import importlib.util
import json
import re
import sys

import pytest
from click.testing import CliRunner

from flexicli.cli import main
from flexicli.generation.decode import depth_colour
from flexicli.generation.patterns import Prompt, TokenRecord, analyse, builtin_prompts, read_prompts
from flexicli.generation.report import _tint
from tiny_text import NUM_LAYERS, ROUTED, tiny_checkpoint

OUTPUTS = ["report.html", "tokens.jsonl", "summary.json"]
PNGS = ["layer_usage.png", "category_layers.png"]  # only with matplotlib (the optional `plots` extra)
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pat"))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "w1 w2 w3", "category": "alpha"}, {"prompt": "w9 w8", "category": "beta", "id": "b1"},
            {"prompt": "w40 w41 w42 w43", "category": "beta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def flexi(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_patterns_writes_everything_consistently(ckpt, prompts_file, tmp_path):
    out = tmp_path / "pat"
    r = flexi("patterns", "-m", str(ckpt), "-o", str(out), "--prompts", str(prompts_file), "--max-new-tokens", "6",
              "--threshold", "0.5", "--json")
    assert r.exit_code == 0, r.output
    pngs = PNGS if HAVE_MATPLOTLIB else []
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS + pngs)
    records = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert {r["category"] for r in records} == {"alpha", "beta"} and "b1" in {r["prompt_id"] for r in records}
    for rec in records:
        assert rec["decisions"] == [0 if layer in rec["skipped_layers"] else 1 for layer in ROUTED]
        assert rec["layers_used"] == NUM_LAYERS - len(rec["skipped_layers"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == len(records) == json.loads(r.stdout)["tokens"]
    for j, layer in enumerate(ROUTED):  # the bowl is the mean of the recorded decisions
        assert summary["layer_usage"][layer] == pytest.approx(sum(r["decisions"][j] for r in records) / len(records))
    assert summary["layer_usage"][0] == 1.0
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = (out / "report.html").read_text()
    # Self-contained: nothing to fetch, no scripts, not even an XML namespace URL.
    assert not re.search(r"https?:|//[a-z]|<script|<link|<img|<iframe|url\(|@import", html, re.IGNORECASE)
    assert html.count("<svg") == 2
    # The depth map shows each token with the colour of its recorded layer count, in order.
    spans = re.findall(r'<span class="t" style="background:(#[0-9a-f]{6})" title="(\d+) layers', html)
    assert [int(n) for _, n in spans] == [r["layers_used"] for r in records]
    fewest = NUM_LAYERS - len(ROUTED)
    assert all(c == _tint(depth_colour(int(n), fewest, NUM_LAYERS)) for c, n in spans)


def test_without_matplotlib_the_report_and_tokens_are_still_written(ckpt, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if it were not installed
    out = tmp_path / "pat"
    r = flexi("patterns", "-m", str(ckpt), "-o", str(out), "--prompts", str(prompts_file), "--max-new-tokens", "4",
              "--json")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert json.loads(r.stdout)["files"] == ["report.html", "tokens.jsonl", "summary.json"]
    assert (out / "tokens.jsonl").read_text().strip() and "<svg" in (out / "report.html").read_text()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'flexicli[plots]'" in lines[0], r.stderr


def test_existing_output_and_bad_prompts_leave_nothing_behind(ckpt, prompts_file, tmp_path):
    out = tmp_path / "pat"
    out.mkdir()
    (out / "keep").write_text("mine")
    r = flexi("patterns", "-m", str(ckpt), "-o", str(out), "--prompts", str(prompts_file))
    assert r.exit_code == 2 and "already exists" in r.stderr and (out / "keep").read_text() == "mine"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    r = flexi("patterns", "-m", str(ckpt), "-o", str(tmp_path / "new"), "--prompts", str(bad))
    assert r.exit_code == 2 and "bad.jsonl:1" in r.stderr and not (tmp_path / "new").exists()
    r = flexi("patterns", "-m", str(ckpt), "-o", str(tmp_path / "new"), "--categories", "poetry")
    assert r.exit_code == 2 and "unknown task categories" in r.stderr and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_builtin_prompts_and_text_prompt_files(tmp_path):
    prompts = builtin_prompts(per_category=1)
    assert len(prompts) == 7 and len({p.id for p in prompts}) == 7
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    assert [p.text for p in read_prompts(f)] == ["first prompt", "second prompt"]


def test_analysis_ranks_tokens_by_mean_over_occurrences():
    def rec(text, used, skipped, cat="c"):
        return TokenRecord(cat, "p", 0, 0, text, used, skipped, [0 if layer in skipped else 1 for layer in (2, 3)])

    records = ([rec(" the", 2, [2, 3])] * 3 + [rec("the", 4, [])] + [rec(" 7", 4, [], "math")] * 3
               + [rec(" x", 3, [3])] * 2)
    a = analyse(records, 4, [2, 3], min_count=3)
    assert a.cheapest[0] == {"text": "the", "mean_layers_used": 2.5, "count": 4}  # " the" and "the" together
    assert a.hungriest[0] == {"text": "7", "mean_layers_used": 4.0, "count": 3}
    assert all(r["text"] != "x" for r in a.cheapest + a.hungriest)  # seen twice only
    assert a.layer_usage == [1.0, 1.0, pytest.approx(6 / 9), pytest.approx(4 / 9)]
    assert a.category_mean_layers == {"c": pytest.approx((6 + 4 + 6) / 6), "math": 4.0}
    same = analyse([rec(" a", 4, [])] * 3 + [rec(" b", 4, [])] * 3, 4, [2, 3])
    assert same.hungriest == same.cheapest == []  # all equal: nothing to rank
    assert Prompt("a", "b", "c").category == "b"


def test_patterns_on_a_base_model_without_checkpoint(ckpt, prompts_file, tmp_path):
    r = flexi("patterns", "--base", str(ckpt.parent / "tiny-base"), "-o", str(tmp_path / "b"), "--prompts",
              str(prompts_file), "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layer_usage"] == [1.0] * NUM_LAYERS and out["mean_layers_used"] == NUM_LAYERS
    assert "routed layers none" in (tmp_path / "b" / "report.html").read_text()
