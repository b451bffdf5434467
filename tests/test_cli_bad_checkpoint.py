"""A checkpoint whose flexi_config.json does not fit its base (or itself) fails before anything runs: exit 2 and
one line on stderr naming the problem. Also `flexi train`'s --skip-target range, checked before and after loading."""

import json
import shutil

import pytest
from click.testing import CliRunner

from flexicli.cli import main
from tiny_text import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("badckpt"))  # 4 layers, hidden 64, routes layers 2 and 3


def flexi(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def edited(ckpt, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(ckpt, folder)
    path = folder / "flexi_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("changes, needle", [
    ({"routed_layers": [2, 99]}, "routed layers [99] are outside 0..3"),
    ({"routed_layers": [-1, 3]}, "routed layers [-1] are outside 0..3"),
    ({"routed_layers": [3, 2]}, "must be increasing"),
    ({"routed_layers": []}, "routed_layers must be a non-empty list"),
    ({"num_layers": 30, "routed_layers": [28, 29]}, "a base with 30 layers"),
    ({"hidden_size": 32}, "hidden_size is 32"),
    ({"adapter_dim": 0}, "adapter_dim must be a whole number >= 1"),
    ({"adapter_dim": 7}, "adapter.down_proj.weight has shape"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"threshold": 1.5}, "threshold must be a number in [0, 1]"),
    ({"threshold": "0.5"}, "threshold must be a number in [0, 1]"),
    ({"gate_mode": "hard"}, "gate_mode must be 'ste' or 'scale'"),
    ({"parts": {"layers": "model.blocks"}}, "no decoder layers at 'model.blocks'"),
])
def test_config_that_does_not_fit_fails_with_one_line(ckpt, tmp_path, changes, needle):
    r = flexi("generate", "-m", str(edited(ckpt, tmp_path, **changes)), "--max-new-tokens", "1", "w1")
    assert r.exit_code == 2, r.stderr
    line = one_line(r)
    assert line.startswith("error: ") and needle in line and "unexpected" not in line, line


def test_unedited_checkpoint_still_loads(ckpt):
    r = flexi("generate", "-m", str(ckpt), "--max-new-tokens", "1", "w1")
    assert r.exit_code == 0, r.stderr


def test_train_skip_target_range(ckpt):
    r = flexi("train", "-m", str(ckpt), "--skip-target", "-1")
    assert r.exit_code == 2 and "--skip-target -1.0 is negative" in one_line(r)
    r = flexi("train", "-m", str(ckpt), "--skip-target", "3")  # checked against the model once loaded
    assert r.exit_code == 2 and "outside 0..2 (the routed layers)" in one_line(r)
