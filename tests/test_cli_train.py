"""`flexi train` through the real CLI on the real SmolLM2 (a couple of steps) and its bad-input errors."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def flexi(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "flexicli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_train_cli_few_steps_and_errors(tmp_path):
    assert flexi("convert", cwd=tmp_path).returncode == 0  # ./flexi-model from the embedded model
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Tell me about the number {i}."},
                          {"role": "assistant", "content": f"The number {i} comes after {i - 1}. " * 6}]}
            for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    r = flexi("train", "--skip-target", "99", cwd=tmp_path)
    assert r.returncode == 2 and "outside 0..28" in r.stderr.strip().splitlines()[-1]
    r = flexi("train", "--skip-target", "2", "--data", str(tmp_path / "missing.jsonl"), cwd=tmp_path)
    assert r.returncode == 2 and "no such data file" in r.stderr

    # the CLI's plumbing, not the method: the warm starts and the calibration have their own tests (test_adapter_init,
    # test_train), and on the real model they cost minutes (28 routed layers; after 3 steps the gates tie and the
    # calibration probes its whole budget)
    r = flexi("train", "--skip-target", "2", "--data", str(data), "--steps", "3", "--batch-size", "2",
              "--seq-len", "64", "--router-init", "none", "--adapter-init", "none", "--no-calibrate", "--json",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    for key in ("mean_skipped_layers", "kl", "top1_agreement", "greedy_match", "per_layer_skip_rate", "threshold"):
        assert key in summary
    ckpt = tmp_path / "flexi-model"
    cfg = json.loads((ckpt / "flexi_config.json").read_text())
    assert cfg["training"]["skip_target"] == 2 and cfg["training"]["steps_done"] == 3
    assert len((ckpt / "metrics.jsonl").read_text().splitlines()) == 3
    assert (ckpt / "train_state.safetensors").is_file()
    (ckpt / "train_state.safetensors").unlink()  # trained, but its state gone: --resume refuses (a folder never
    r = flexi("train", "--resume", cwd=tmp_path)  # saved to starts from step 0: tests/test_cli_resume.py)
    assert r.returncode == 2 and "nothing to resume" in r.stderr
