"""The built wheel carries what an installed flexicli needs beside its code: the recipes and the prompt data.

The wheel is installed without dependencies into a fresh venv that sees this interpreter's site-packages through a
.pth file (torch, transformers, ... without downloading them), and run from outside the repository, so nothing can
come from the source tree."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_wheel_ships_recipes_and_they_load(tmp_path):
    # setuptools builds in the source folder (build/, *.egg-info): build a copy of what the wheel is made from.
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(REPO / "flexicli", src / "flexicli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    # --no-build-isolation: the setuptools installed here (the test extra) builds it, offline
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src,
        cwd=tmp_path)
    (wheel,) = wheels.glob("flexicli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    recipes = [f"flexicli/train/recipes/{p.name}" for p in (REPO / "flexicli/train/recipes").glob("*.yaml")]
    assert "flexicli/train/recipes/smollm2-135m-cpu.yaml" in recipes  # every recipe in the source, so not none
    for f in (*recipes, "flexicli/data/prompts.jsonl"):
        assert f in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # Without PYTHONPATH: the source tree must not shadow the wheel (nor its metadata make pip skip the install)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, env=env)
    # After the install: with this environment visible, pip would take its (editable) flexicli as installed already
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "deps-from-the-test-env.pth").write_text("\n".join(sorted(ours)) + "\n")

    where = run(python, "-c", "import flexicli; print(flexicli.__file__)", cwd=tmp_path, env=env).stdout
    assert where.startswith(str(site)), where
    # The recipe loads and its settings pass the checks; the run then stops at the (missing) checkpoint.
    r = subprocess.run([str(venv / "bin" / "flexi"), "train", "--recipe", "smollm2-135m-cpu", "--skip-target", "1",
                        "-m", str(tmp_path / "no-checkpoint")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "no checkpoint folder" in r.stderr and "no recipe" not in r.stderr, r.stderr
