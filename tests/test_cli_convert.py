"""`flexi convert` through the real CLI: the summary, and one clear line for each kind of bad input."""

import json
import os
import subprocess
import sys


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
