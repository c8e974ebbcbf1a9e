"""`pip install .` (not editable): the wheel holds every top-level module of the repository, and
the installed copy imports and trains from another directory with nothing of the repository on
the path. Offline: the wheel is built with the installed setuptools (--no-build-isolation --no-index)."""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from helpers import ROOT, TINY

RUNS_ON_IMPORT = {"train"}  # a script whose module body is the training loop: run with -m instead

def top_level_modules():
    return sorted(os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py"))

def pip(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet"], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PIP_NO_INPUT="1"))
    assert p.returncode == 0, p.stderr[-3000:]

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel's file names, the folder it was installed into). Built from a copy of the
    repository's top-level files (pyproject.toml, README.md, the modules), so the checkout gets no
    build/ or egg-info of its own."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for f in os.listdir(ROOT):
        if os.path.isfile(os.path.join(ROOT, f)):
            shutil.copy2(os.path.join(ROOT, f), src / f)
    pip("wheel", "--no-build-isolation", "-w", str(tmp / "dist"), ".", cwd=src)
    wheel, = glob.glob(str(tmp / "dist" / "*.whl"))
    pip("install", "--target", str(tmp / "site"), wheel, cwd=tmp)
    return zipfile.ZipFile(wheel).namelist(), tmp / "site"

def run_installed(target, cwd, *args):
    """python -S with the install folder and site-packages alone on the path: no .pth files, so an
    editable install of this repository (its finder) cannot stand in for a module the wheel lacks."""
    site = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    env = dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{site}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

def test_wheel_holds_every_module(installed):
    names, _ = installed
    mods = top_level_modules()
    assert {"train", "generate", "sweep", "bench", "demo", "model", "methods"} <= set(mods)
    missing = [m for m in mods if f"{m}.py" not in names]
    assert not missing, f"pyproject.toml's py-modules lacks {missing}"

def test_installed_modules_import_from_elsewhere(installed, tmp_path):
    _, target = installed
    mods = [m for m in top_level_modules() if m not in RUNS_ON_IMPORT]
    code = ("import importlib, json, sys\n"
            f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {mods!r}}}))")
    p = run_installed(target, tmp_path, "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    files = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(files) == set(mods)
    for m, f in files.items():  # from the install, not the checkout
        assert os.path.dirname(os.path.abspath(f)) == str(target), (m, f)

def test_installed_train_runs_from_elsewhere(installed, tmp_path):
    """python -m train from another directory: a two-step run on absolute data paths (every module
    train.py imports after its config is read comes from the install), then -m generate on its model."""
    _, target = installed
    args = [a.replace("=data/", f"={ROOT}/data/") for a in TINY]
    p = run_installed(target, tmp_path, "-m", "train", *args, "--max_iters=2", "--train_batch_size=4",
                      "--micro_train_batch_size=4", "--out_dir=run")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary and (tmp_path / "run" / "final" / "config.json").exists()
    assert not os.path.exists(os.path.join(ROOT, "run"))
    p = run_installed(target, tmp_path, "-m", "generate", "--out_dir=run", "--prompt=red fox", "--temperature=0",
                      "--max_new_tokens=4", "--out=gen.jsonl")
    assert p.returncode == 0, p.stderr[-3000:]
    row, = [json.loads(l) for l in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert row["instruction"] == "red fox" and isinstance(row["output"], str)
