"""`flexi convert` through the real CLI: the summary, and one clear line for each kind of bad input."""

import json
import os
import subprocess
import sys

import pytest


def flexi(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flexicli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_convert_json_summary(tiny_folder, tmp_path):
    r = flexi("convert", str(tiny_folder), "-o", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "llama" and info["routed_layers"] == "1..1 (1)"
    assert 0 < info["trainable_share"] < 0.2


def one_error_line(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_missing_model(tmp_path):
    line = one_error_line(flexi("convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")))
    assert "no such model folder" in line
    assert not (tmp_path / "out").exists()


def test_hub_id_offline(tmp_path):
    line = one_error_line(flexi("convert", "nobody/no-such-model", "-o", str(tmp_path / "out")))
    assert "could not find model" in line and not (tmp_path / "out").exists()


def test_non_decoder(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128).save_pretrained(
        tmp_path / "bert")
    line = one_error_line(flexi("convert", str(tmp_path / "bert"), "-o", str(tmp_path / "out")))
    assert "'bert'" in line and "not a decoder-only" in line
    assert not (tmp_path / "out").exists()


def test_existing_output_and_bad_layers(tiny_folder, tmp_path):
    (tmp_path / "out").mkdir()
    assert "already exists" in one_error_line(flexi("convert", str(tiny_folder), "-o", str(tmp_path / "out")))
    line = one_error_line(flexi("convert", str(tiny_folder), "-o", str(tmp_path / "o2"), "--layers", "5-9"))
    assert "layers 0..1" in line and not (tmp_path / "o2").exists()


def test_corrupted_checkpoint_fails_in_a_fresh_process(tiny_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert flexi("convert", str(tiny_folder), "-o", str(ckpt)).returncode == 0
    (ckpt / "flexi_weights.safetensors").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-c", "from flexicli.core.flexi_model import FlexiModel; import sys;"
                        f"FlexiModel.load({str(ckpt)!r})"], capture_output=True, text=True)
    assert r.returncode != 0 and "corrupted" in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = flexi("--debug", "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_layer_specs():
    """The default routes every layer but the first two (a model under four layers: its second half); 'half' is
    FlexiDepth's second half; '2-' runs to the last layer; bad specs are refused, not read as something else."""
    from flexicli.core.errors import BadInput
    from flexicli.core.flexi_model import parse_layers

    assert parse_layers(None, 30) == list(range(2, 30)) and parse_layers(None, 18) == list(range(2, 18))
    assert parse_layers(None, 2) == [1] and parse_layers(None, 3) == [1, 2] and parse_layers(None, 4) == [2, 3]
    assert parse_layers("half", 30) == list(range(15, 30)) and parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("2-", 6) == [2, 3, 4, 5] and parse_layers("0,3-", 5) == [0, 3, 4]
    assert parse_layers("10-12,20", 30) == [10, 11, 12, 20]
    for bad in ("2-x", "-", "a", "5-", "3-1"):
        with pytest.raises(BadInput):
            parse_layers(bad, 4)


def test_the_same_conversion_writes_the_same_weights(tiny_folder, tmp_path):
    """The routers' and adapters' random start comes from --seed (0 by default), not from the process: two runs of one
    training config on two conversions are the same run. The library call leaves the caller's random state alone."""
    import torch
    from safetensors.torch import load_file

    from flexicli.convert import convert

    weights = lambda name: load_file(tmp_path / name / "flexi_weights.safetensors")  # noqa: E731
    state = torch.get_rng_state()
    convert(str(tiny_folder), tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state)
    assert flexi("convert", str(tiny_folder), "-o", str(tmp_path / "b")).returncode == 0
    assert flexi("convert", str(tiny_folder), "-o", str(tmp_path / "c"), "--seed", "1").returncode == 0
    a, b, c = weights("a"), weights("b"), weights("c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed is what draws them
