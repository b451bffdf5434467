"""Save/load round trip and every way a checkpoint can be bad."""

import json

import pytest
import torch

from conftest import tiny_model
from flexicli.core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, fingerprint
from flexicli.convert import convert
from flexicli.core.errors import CheckpointError
from flexicli.core.flexi_model import ADAPTER_REDUCTION, FlexiModel


def test_round_trip_identical_logits_and_no_base_weights(tiny_folder, tmp_path):
    fm = convert(str(tiny_folder), tmp_path / "ckpt", layers="all")
    for layer in fm.layers:  # make the adapters/routers non-trivial so the round trip means something
        torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
    fm.save(tmp_path / "ckpt", overwrite=True)
    x = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        before = fm.model(x).logits
        loaded = FlexiModel.load(tmp_path / "ckpt")
        after = loaded.model(x).logits
    assert torch.equal(before, after)
    assert loaded.config.routed_layers == [0, 1]
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert files == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
    base_bytes = sum(p.numel() * 4 for p in tiny_model("llama").parameters())
    assert (tmp_path / "ckpt" / WEIGHTS_FILE).stat().st_size < base_bytes / 5


def test_fingerprint_ignores_dtype_and_wrappers_but_sees_changes():
    m = tiny_model("llama")
    fp = fingerprint(m)
    assert fingerprint(m.to(torch.bfloat16)) == fp
    fm = FlexiModel.wrap(m.float(), base_model="tiny")
    assert fingerprint(fm.model) == fp
    with torch.no_grad():
        fm.layers[0].base_layer.mlp.down_proj.weight.add_(0.01)
    assert fingerprint(fm.model) != fp


def test_changed_base_is_refused(tiny_folder, tmp_path):
    convert(str(tiny_folder), tmp_path / "ckpt")
    tiny_model("llama", seed=1).save_pretrained(tiny_folder)  # someone replaced the base weights
    with pytest.raises(CheckpointError, match="does not match this checkpoint"):
        FlexiModel.load(tmp_path / "ckpt")


def test_corrupted_weights_and_bad_folders(tiny_folder, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        FlexiModel.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a flexicli checkpoint"):
        FlexiModel.load(tmp_path / "empty")
    ckpt = tmp_path / "ckpt"
    convert(str(tiny_folder), ckpt)
    data = (ckpt / WEIGHTS_FILE).read_bytes()
    (ckpt / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        FlexiModel.load(ckpt)
    (ckpt / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        FlexiModel.load(ckpt)


def test_config_is_sorted_json_naming_the_base(tiny_folder, tmp_path):
    convert(str(tiny_folder), tmp_path / "ckpt", layers="1")
    text = (tmp_path / "ckpt" / CONFIG_FILE).read_text()
    cfg = json.loads(text)
    assert list(cfg) == sorted(cfg)
    assert cfg["base_model"] == str(tiny_folder.resolve()) and cfg["routed_layers"] == [1]
    assert cfg["adapter_dim"] == 128 // ADAPTER_REDUCTION and cfg["threshold"] == 0.5


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # exited and reaped: no such process now (barring reuse within this test)


def test_overwrite_swaps_in_one_step_and_leaves_nothing_beside(tmp_path):
    from flexicli.core.checkpoint import _exchange, read_config

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem has no RENAME_EXCHANGE (the two-rename fallback is tested below)")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()
    fm = FlexiModel.wrap(tiny_model("llama"), base_model="tiny")
    fm.save(tmp_path / "ckpt")
    fm.config.threshold = 0.25
    fm.save(tmp_path / "ckpt", overwrite=True)
    assert read_config(tmp_path / "ckpt").threshold == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ckpt"]


def test_leftovers_of_killed_writers_are_cleaned_and_a_lost_folder_restored(tmp_path, monkeypatch):
    """A writer killed mid-save leaves .NAME.tmp-PID-* (and, after the swap, the old folder) beside the checkpoint;
    the two-rename fallback killed between its renames leaves no folder, the old one as .NAME.old-PID."""
    import os

    from flexicli.core import checkpoint
    from flexicli.core.checkpoint import read_config

    fm = FlexiModel.wrap(tiny_model("llama"), base_model="tiny")
    ckpt = tmp_path / "ckpt"
    fm.save(ckpt)
    dead = _dead_pid()
    ckpt.rename(tmp_path / f".ckpt.old-{dead}")  # killed between the fallback's two renames
    (tmp_path / f".ckpt.tmp-{dead}-abc").mkdir()  # its new folder, complete or not
    (tmp_path / f".ckpt.tmp-{os.getpid()}-live").mkdir()  # a live writer's: left alone
    assert read_config(ckpt).threshold == 0.5  # the reader finds the old folder back in place
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # the fallback, as off Linux
    fm.config.threshold = 0.25
    fm.save(ckpt, overwrite=True)
    assert read_config(ckpt).threshold == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ckpt.tmp-{os.getpid()}-live", "ckpt"]
