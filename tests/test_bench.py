"""flexi bench: the library's result on a tiny model, the choice of forced layers, and the CLI contract."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from flexicli.speed.bench import choose_skip_layers, run_bench
from flexicli.core.flexi_model import FlexiModel


def flexi(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flexicli", *args], capture_output=True, text=True, env=env)


def routed_tiny(layers=(0, 1), skip_bias=None):
    fm = FlexiModel.wrap(tiny_model("llama"), routed_layers=list(layers), base_model="tiny")
    with torch.no_grad():
        for layer, bias in zip(fm.layers, skip_bias or []):
            layer.router.bias.fill_(bias)  # very negative: the layer skips every token at threshold 0.5
    return fm


def test_chooses_the_layers_the_router_skips_most_latest_first_on_ties():
    fm = routed_tiny(skip_bias=[-20.0, 20.0])
    ids = torch.randint(3, 128, (1, 16))
    layers, usage = choose_skip_layers(fm, ids, 1)
    assert layers == [0] and usage == [0.0, 1.0]
    fresh = routed_tiny()  # skips nothing: ties, so the last routed layers
    assert choose_skip_layers(fresh, ids, 1)[0] == [1]


def test_run_bench_reports_every_configuration():
    fm = routed_tiny(skip_bias=[-20.0, 20.0])
    r = run_bench(fm, skip=1, prefill_len=16, decode_prompt=4, new_tokens=2, repeats=1)
    assert r["skip_layers"] == [0]
    assert set(r["tokens_per_s"]["prefill"]) == {"original", "routed", "fixed", "run"}
    assert all(v > 0 for kind in r["tokens_per_s"].values() for v in kind.values())
    assert r["prefill_ratio"] == pytest.approx(r["tokens_per_s"]["prefill"]["routed"]
                                               / r["tokens_per_s"]["prefill"]["original"])
    assert r["mean_skipped_at_threshold"] == {"prefill": 1.0, "decode": 1.0}
    assert r["device"].startswith("cpu") and r["shapes"]["prefill"] == [1, 16]
    assert r["engine"].startswith("CPU run")


def test_bad_skip_is_bad_input():
    from flexicli.core.errors import BadInput

    with pytest.raises(BadInput, match="routes 2 layers"):
        run_bench(routed_tiny(), skip=3)


@pytest.fixture
def tiny_ckpt(tiny_folder, tmp_path):
    from flexicli.convert import convert

    convert(str(tiny_folder), tmp_path / "ckpt", device="cpu")
    return tmp_path / "ckpt"


def test_cli_json(tiny_ckpt):
    r = flexi("bench", "-m", str(tiny_ckpt), "--skip", "1", "--prefill-len", "16", "--decode-prompt", "4",
              "--new-tokens", "2", "--repeats", "1", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"prefill_ratio", "decode_ratio", "device"} <= set(out)
    assert out["skip_layers"] == [1]


def test_cli_table(tiny_ckpt):
    r = flexi("bench", "-m", str(tiny_ckpt), "--skip", "1", "--prefill-len", "16", "--decode-prompt", "4",
              "--new-tokens", "2", "--repeats", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "flexi bench on cpu" in r.stdout and "original" in r.stdout
    assert "GPU decode engine: CPU run" in r.stdout


@pytest.mark.parametrize("args,needle", [(["--skip", "5"], "routes 1 layers"), (["--threads", "0"], "--threads 0")])
def test_cli_bad_input_is_one_line(tiny_ckpt, args, needle):
    r = flexi("bench", "-m", str(tiny_ckpt), *args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
