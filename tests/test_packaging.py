"""The installable runtime (issue 15): the wheel holds one top-level package, `ressformer`; installed
with its dependencies alone (numpy, onnxruntime, click) into a fresh venv it runs an export without
torch or onnx, installs no generic top-level names, and the torch commands name the extra.

The venv's dependencies come from PyPI (or pip's cache): ~30-60 s on a first run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "node_modules", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".ruff_cache", ".hypothesis")


def sh(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the build leaves nothing in the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    r = sh(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
           cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("ressformer-*.whl")
    return whl


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"ressformer", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for sub in ("export", "runtime", "parity", "bench"):
        assert f"ressformer/{sub}/__init__.py" in names, sub
    assert "ressformer/runtime/session.py" in names and "ressformer/export/exporter.py" in names
    assert "ressformer/native.c" in names  # the C kernels' source, built on first use


def test_runtime_only_install(wheel, tiny_export, tmp_path):
    venv = tmp_path / "venv"
    r = sh(sys.executable, "-m", "venv", venv)
    assert r.returncode == 0, r.stderr
    py, exe = venv / "bin" / "python", venv / "bin" / "ressformer"
    r = sh(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "work"  # not the checkout: its folders must not be importable
    work.mkdir()
    check = """
import importlib.util, sys
from ressformer.runtime import ReSSFormerSession
import ressformer.cli
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxscript')], sorted(sys.modules)
for name in ('torch', 'onnx', 'onnxscript', 'safetensors'):
    assert importlib.util.find_spec(name) is None, name + ' is installed'
for name in ('export', 'runtime', 'bench', 'parity_tests', 'parity'):
    assert importlib.util.find_spec(name) is None, 'top-level module ' + name + ' is installed'
print('ok')
"""
    r = sh(py, "-c", check, cwd=work)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    r = sh(exe, "generate", tiny_export, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "0",
           "--threads", "1", cwd=work)
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stdout + r.stderr
    r = sh(exe, "train", "--help", cwd=work)
    assert r.returncode == 0 and "--steps" in r.stdout, r.stderr
    r = sh(exe, "train", "--steps", "1", cwd=work)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: `ressformer train` needs the torch extra: pip install torch==2.13.0"), lines
    assert not list(work.iterdir())  # nothing written
