"""What `pip install .` (not editable) gives a user: a wheel that carries every package folder, the vocab and the
DeepSpeed configs, and console scripts that end a mistake in one line on stderr and exit status 2.

The wheel is built offline from a copy of the tree (setuptools of this environment, no build isolation), installed
into a fresh virtualenv that sees this environment's dependencies, and its commands run from there."""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lfzh_ds.deepspeed_configs import deepspeed_config_path, deepspeed_configs_dir

REPO = Path(__file__).resolve().parents[1]
TREE = ("pyproject.toml", "README.md", "lfzh_ds", "data_service", "launch", "ds_configs")
CONFIGS = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))

# Each console script with a mistake a user makes: one line on stderr naming it, exit status 2.
MISTAKES = {
    "lfzh-preprocess": (["--input", "/nonexistent/news.jsonl", "--output", "shards"], "/nonexistent/news.jsonl"),
    "lfzh-convert": (["--from", "/nonexistent", "--to", "out"], "/nonexistent"),
    "lfzh-export": (["--from", "/nonexistent", "--to", "out"], "/nonexistent"),
    "lfzh-evaluate": (["bpc", "--model", "/nonexistent", "--data", "/nonexistent"], "/nonexistent"),
    "lfzh-finetune": (["--model", "/nonexistent", "--output-dir", "out", "--task", "ccf-sentiment"], "/nonexistent"),
    "lfzh-pretrain": (["--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"), "--data", "/nonexistent/shards", "--output-dir", "out",
                       "--model-config", "/nonexistent/config.json", "--max-steps", "2"], "/nonexistent"),
}
# These import torch and transformers before they can look at their arguments' files (about 10 s each on 2 cores).
HEAVY = {"lfzh-convert", "lfzh-export", "lfzh-evaluate", "lfzh-pretrain"}


def without_pythonpath() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the installed wheel, not this checkout
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in TREE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(out)], check=True, cwd=source)
    (path,) = out.glob("longformer_zh_ds-*.whl")
    return path


@pytest.fixture(scope="module")
def venv_bin(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --system-site-packages sees the base interpreter's packages only: where the tests run in a virtualenv (as the
    # README suggests), its dependencies live in that virtualenv's site-packages, which the new one gets as plain
    # path lines, after its own (the wheel comes first; the checkout's editable-install .pth is not read).
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "outer_environment.pth").write_text("".join(f"{d}\n" for d in site.getsitepackages()))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, env=without_pythonpath(), capture_output=True)
    return venv / "bin"


def test_the_wheel_carries_every_package_the_vocab_and_the_deepspeed_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(REPO)) for top in ("lfzh_ds", "data_service", "launch")
                      for p in (REPO / top).rglob("__init__.py"))
    assert [p for p in packages if f"{p}/__init__.py" not in names] == []  # pyproject.toml lists them all
    assert "lfzh_ds/resources/vocab.txt" in names
    assert sorted(n.split("/")[-1] for n in names if n.startswith("lfzh_ds/ds_configs/")) == CONFIGS
    assert {"zero2.json", "cpu.json", "quickstart_cpu.json"} <= set(CONFIGS)
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/"
                                               "entry_points.txt").decode()
    assert all(f"{script} = launch.cli:" in entry_points for script in MISTAKES)


def test_a_shipped_config_is_found_in_the_checkout_and_an_unknown_name_lists_the_shipped_ones():
    assert deepspeed_configs_dir() == REPO / "ds_configs"
    assert deepspeed_config_path("cpu.json") == REPO / "ds_configs" / "cpu.json"
    with pytest.raises(FileNotFoundError, match=r"no DeepSpeed config 'zero9\.json' ships .*cpu\.json, cpu_bf16\.json"):
        deepspeed_config_path("zero9.json")


def test_the_installed_package_finds_its_configs_inside_itself(venv_bin, tmp_path):
    code = ("import lfzh_ds, launch, data_service; from lfzh_ds.deepspeed_configs import deepspeed_config_path; "
            "print(lfzh_ds.__file__, launch.__file__, data_service.__file__, deepspeed_config_path('zero2.json'), sep='\\n')")
    lines = subprocess.run([str(venv_bin / "python"), "-c", code], capture_output=True, text=True, check=True,
                           cwd=tmp_path, env=without_pythonpath()).stdout.splitlines()
    site = venv_bin.parent / "lib"
    assert all(Path(line).is_relative_to(site) for line in lines), lines
    assert Path(lines[-1]).read_bytes() == (REPO / "ds_configs" / "zero2.json").read_bytes()


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in HEAVY else s for s in MISTAKES])
def test_every_console_script_ends_a_mistake_in_one_line_and_exit_status_2(venv_bin, tmp_path, script):
    args, named = MISTAKES[script]
    # DS_ACCELERATOR=cpu: DeepSpeed's own "Setting accelerator to CPU" warning is not the command's line
    done = subprocess.run([str(venv_bin / script), *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**without_pythonpath(), "DS_ACCELERATOR": "cpu"}, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "Traceback" not in done.stderr
