"""Crash safety of `flexi train` through the real CLI, in real processes (issue #14).

One run is SIGKILLed again and again (before its first save, mid-step, inside a save at each stage of the atomic
write, and twice at a random moment) and each time rerun with `--resume`; it must end with the same bytes as an
unbroken run of the same command, and after every kill the checkpoint folder must be whole and consistent.

Exact kill points come from the FLEXI_TEST_KILL_AT=POINT:N hook (flexicli/core/checkpoint.py kill_point: the process
SIGKILLs itself the Nth time it passes POINT); the random ones are a plain SIGKILL from here after a seeded delay.
Every process runs with one thread, so the unbroken and the resumed runs compute bit-for-bit the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import tiny_model

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 16, 3
SAVES = [d for d in range(1, STEPS + 1) if d % SAVE_EVERY == 0 or d == STEPS]  # steps a checkpoint is saved at
FILES = {"README.md", "flexi_config.json", "flexi_weights.safetensors", "metrics.jsonl", "train_state.safetensors"}


def env(kill: str | None = None) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",  # this checkout's flexicli, one thread
         "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    e.pop("FLEXI_TEST_KILL_AT", None)
    if kill:
        e["FLEXI_TEST_KILL_AT"] = kill
    return e


def start(args: list[str], cwd: Path, kill: str | None = None) -> subprocess.Popen:
    log = (cwd / "stderr.log").open("w")  # a file, not a pipe: readable while it runs and after a SIGKILL
    return subprocess.Popen([sys.executable, "-m", "flexicli", *args], cwd=cwd, env=env(kill),
                            stdout=subprocess.DEVNULL, stderr=log)


def train_args(data: Path, resume: bool) -> list[str]:
    return ["train", "-m", "ckpt", "--skip-target", "0.5", "--data", str(data), "--steps", str(STEPS),
            "--seq-len", "32", "--batch-size", "4", "--save-every", str(SAVE_EVERY), "--lr", "0.1", "--json",
            *(["--resume"] if resume else [])]


def check_folder(folder: Path, keys: set[str]) -> int:
    """The checkpoint a later command would read: only the checkpoint's own files, all readable, and config,
    weights and training state from the same save. Returns the step it holds (0: as converted)."""
    from safetensors import safe_open

    from flexicli.core.checkpoint import read_config, read_weights

    names = {p.name for p in folder.iterdir()}
    assert names <= FILES and {"flexi_config.json", "flexi_weights.safetensors"} <= names, names
    config = read_config(folder)
    assert set(read_weights(folder)) == keys
    saved = (config.training or {}).get("steps_done", 0)
    if saved:
        with safe_open(folder / "train_state.safetensors", "pt") as f:
            assert json.loads(f.metadata()["scalars"])["step"] == saved
        assert saved in SAVES
    else:
        assert "train_state.safetensors" not in names
    if "metrics.jsonl" in names:  # appended live: complete lines 1..k, k >= the saved step (a torn last line at most)
        text = (folder / "metrics.jsonl").read_text()
        lines = text.split("\n")[:-1]  # a torn last line (no newline yet) left out
        assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
        assert len(lines) >= saved
    return saved


def kill_after_training_starts(p: subprocess.Popen, cwd: Path, delay: float) -> None:
    """SIGKILL `p` `delay` seconds after it logs its data line (just before the teacher cache and the steps)."""
    log = cwd / "stderr.log"
    while p.poll() is None and "training rows" not in log.read_text():
        time.sleep(0.005)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # a timing: not reproducible


def test_killed_and_resumed_run_ends_like_an_unbroken_one(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # a sharp head: the distillation loss is not ~0, so training has something to do
        model.get_output_embeddings().weight.mul_(30.0)
    model.save_pretrained(tmp_path / "tiny")  # no tokenizer: trained from token ids
    rng = random.Random(14)
    data = tmp_path / "tokens.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [rng.randrange(3, 128) for _ in range(rng.randrange(20, 60))]})
                            + "\n" for _ in range(40)))
    ref, broken = tmp_path / "ref", tmp_path / "broken"  # same relative -m ckpt: the recorded command matches
    ref.mkdir()
    broken.mkdir()
    r = subprocess.run([sys.executable, "-m", "flexicli", "convert", str(tmp_path / "tiny"), "-o", "ckpt"],
                       cwd=ref, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(ref / "ckpt", broken / "ckpt")
    converted = (ref / "ckpt" / "flexi_weights.safetensors").read_bytes()
    from flexicli.core.checkpoint import read_weights

    keys = set(read_weights(ref / "ckpt"))
    reference = start(train_args(data, resume=False), ref)  # the unbroken run, beside the broken one

    ckpt = broken / "ckpt"
    # (kill point, step the folder holds afterwards); None: known only once it ran
    # (each kill costs a process start, ~5 s of imports: six kills keep the test near a minute)
    plan = [("step:1", 0),  # after step 1, before the first save: nothing saved, a stray metrics line
            ("save-partial:2", 3),  # saved step 3, killed writing step 6's temporary folder (config only)
            ("save-swapped:2", 9),  # saved 6, then 9 swapped in, killed before the old folder was removed
            ("step:2", 9),  # steps 10 and 11 logged, killed before the save at 12
            ("random", None),  # SIGKILL from outside after a seeded delay: mid-step, mid-save, or after the end
            ("summary", None)]  # the final save (with the summary) written, killed before its swap
    saved, kills, first = 0, 0, True
    for point, expect in plan:
        if point == "summary":  # the Nth save from here is the final one
            point = f"save-written:{len([d for d in SAVES if d > saved]) + 1}"
        p = start(train_args(data, resume=not first), broken, kill=None if point == "random" else point)
        if point == "random":
            kill_after_training_starts(p, broken, rng.uniform(0.0, 0.25))
        rc = p.wait(timeout=120)
        stderr = (broken / "stderr.log").read_text()
        if first:
            first = False
        elif saved == 0:  # --resume with nothing saved yet: starts over, and says so
            assert "no train_state.safetensors" in stderr and "starting from step 0" in stderr, stderr
        if rc == 0:  # a random kill that came after the end: the run is done
            assert point == "random", stderr[-2000:]
            break
        assert rc == -signal.SIGKILL, (point, rc, stderr[-2000:])
        kills += 1
        now = check_folder(ckpt, keys)
        assert now >= saved and (expect is None or now == expect), (point, saved, now)
        saved = now
        leftovers = {q.name for q in broken.iterdir()} - {"ckpt", "stderr.log"}
        if point.startswith("save-"):
            assert leftovers, "a kill inside a save leaves its temporary folder beside the checkpoint"
    for _ in range(3):  # rerun with --resume until done
        p = start(train_args(data, resume=True), broken)
        if p.wait(timeout=120) == 0:
            break
    assert p.returncode == 0, (broken / "stderr.log").read_text()[-2000:]
    assert reference.wait(timeout=120) == 0, (ref / "stderr.log").read_text()[-2000:]

    assert kills >= 5
    assert check_folder(ckpt, keys) == STEPS
    assert {q.name for q in broken.iterdir()} == {"ckpt", "stderr.log"}, "the last save removed what kills left"
    for name in ("flexi_weights.safetensors", "train_state.safetensors", "flexi_config.json", "README.md"):
        assert (ckpt / name).read_bytes() == (ref / "ckpt" / name).read_bytes(), name
    assert metrics(ckpt) == metrics(ref / "ckpt"), "each step logged once, with the same numbers"
    assert len(metrics(ckpt)) == STEPS
    # and the run did something: weights moved, tokens were skipped
    assert (ckpt / "flexi_weights.safetensors").read_bytes() != converted
    assert max(r["mean_skipped_layers"] for r in metrics(ckpt)) > 0.05
