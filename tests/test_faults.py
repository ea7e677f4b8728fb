"""Faults (issue 14): a checkpoint save, an export and a resumed training killed at each write step
leave the previous version intact; the next run restores or cleans up what the dead one left and
loads/resumes. Outputs honour the umask.

A kill is simulated in-process by raising `Killed` (a BaseException: no cleanup handler runs, as
after SIGKILL) from `ressformer.fsutil.FAULT_HOOK` or a patched write, then treating this process
as dead for the recovery (`fsutil.pid_alive`); one test kills a real subprocess with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from ressformer import fsutil
from ressformer.checkpoint import load_checkpoint, save_checkpoint
from ressformer.train import TrainConfig, read_metrics, train

from .conftest import perturbed_model

CKPT_STEPS = ["weights", "train_state", "config", "backup", "install", "cleanup"]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup code catches it."""


def kill_at(step):
    def hook(s):
        if s == step:
            raise Killed(s)
    return hook


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def dead_writer(monkeypatch):
    """After a simulated kill, the writing process (this one) counts as dead for recovery."""
    def die():
        monkeypatch.setattr(fsutil, "FAULT_HOOK", None)
        monkeypatch.setattr(fsutil, "pid_alive", lambda pid: False)
    return die


# ---- checkpoint save ------------------------------------------------------------------------------
@pytest.mark.parametrize("step", CKPT_STEPS)
def test_checkpoint_save_killed(tmp_path, monkeypatch, dead_writer, step):
    ck = tmp_path / "ck"
    save_checkpoint(perturbed_model(seed=1), ck)
    ref = tmp_path / "ref"
    shutil.copytree(ck, ref)
    monkeypatch.setattr(fsutil, "FAULT_HOOK", kill_at(step))
    with pytest.raises(Killed):
        save_checkpoint(perturbed_model(seed=2), ck, tensors={"x": torch.ones(3)})
    dead_writer()
    # the next reader sees a complete checkpoint: the old one, or (killed after the install) the new one
    model = load_checkpoint(ck)
    assert model is not None
    if step == "cleanup":
        assert not same_weights(ck, ref)
    else:
        assert same_weights(ck, ref)
    # the next writer removes the dead one's debris
    save_checkpoint(perturbed_model(seed=3), ck)
    assert leftovers(tmp_path) == []
    assert load_checkpoint(ck) is not None


def test_checkpoint_save_error_rolls_back(tmp_path, monkeypatch):
    """An ordinary error (not a kill) while installing puts the old checkpoint back at once."""
    ck = tmp_path / "ck"
    save_checkpoint(perturbed_model(seed=1), ck)
    ref = tmp_path / "ref"
    shutil.copytree(ck, ref)
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the second rename: new folder -> final
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(fsutil.os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(perturbed_model(seed=2), ck)
    monkeypatch.setattr(fsutil.os, "replace", real)
    assert same_weights(ck, ref) and leftovers(tmp_path) == []


def test_real_sigkill_between_renames(tmp_path):
    """A real process killed (SIGKILL) between its two renames: only the backup is left; the next
    load restores it, and the stale temporary folder of the dead PID is removed."""
    ck = tmp_path / "ck"
    save_checkpoint(perturbed_model(seed=1), ck)
    ref = tmp_path / "ref"
    shutil.copytree(ck, ref)
    code = f"""
import os, signal
from ressformer import fsutil
from ressformer.checkpoint import save_checkpoint
from tests.conftest import perturbed_model
os.makedirs({str(tmp_path / f'.ck.tmp-{os.getpid() + 10**6}-zz')!r})  # debris of an older dead writer
fsutil.FAULT_HOOK = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == "install" else None
save_checkpoint(perturbed_model(seed=2), {str(ck)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9
    assert not ck.exists() and any(n.startswith(".ck.old-") for n in leftovers(tmp_path))
    assert load_checkpoint(ck) is not None and same_weights(ck, ref)
    fsutil.recover(ck)
    assert leftovers(tmp_path) == []


# ---- export ---------------------------------------------------------------------------------------
@pytest.fixture
def fast_export(tiny_export, monkeypatch):
    """export_checkpoint with the graphs taken from the session's export (no tracing): the write
    path is the real one, in seconds."""
    import ressformer.export.exporter as ex

    monkeypatch.setattr(ex, "_export_graph", lambda model, name, spec, *a: onnx.load(str(tiny_export / spec.file)))
    return ex


EXPORT_STEPS = ["graph:1", "graph:3", "sidecar", "backup", "install", "cleanup"]


@pytest.mark.parametrize("step", EXPORT_STEPS)
def test_export_killed(tiny_checkpoint, tmp_path, monkeypatch, dead_writer, fast_export, step):
    from ressformer.runtime import ReSSFormerSession

    ex = fast_export
    out = tmp_path / "ex"
    ex.export_checkpoint(tiny_checkpoint, out, progress=lambda s: None)  # v1: fp32
    if step.startswith("graph:"):
        n, real = int(step.split(":")[1]), ex._save
        calls = []

        def save(proto, path):
            calls.append(path)
            if len(calls) == n:
                path.write_bytes(proto.SerializeToString()[:100])  # a torn file, then the kill
                raise Killed(step)
            return real(proto, path)

        monkeypatch.setattr(ex, "_save", save)
    elif step == "sidecar":
        monkeypatch.setattr(ex, "checkpoint_hash", lambda *a: (_ for _ in ()).throw(Killed(step)))
    else:
        monkeypatch.setattr(fsutil, "FAULT_HOOK", kill_at(step))
    with pytest.raises(Killed):
        ex.export_checkpoint(tiny_checkpoint, out, dtype="fp16", overwrite=True, progress=lambda s: None)
    dead_writer()
    monkeypatch.undo()
    monkeypatch.setattr(fsutil, "pid_alive", lambda pid: False)
    fsutil.recover(out)  # what the next export (or an explicit recovery) does first
    meta = json.loads((out / "ressformer.json").read_text())
    assert meta["dtype"] == ("fp16" if step == "cleanup" else "fp32")
    sess = ReSSFormerSession(out)  # hashes verified: a complete export
    logits, _ = sess.forward(np.array([[1, 2, 3]]))
    assert logits.shape[-1] == 256
    assert leftovers(tmp_path) == []


# ---- resumed training -----------------------------------------------------------------------------
FAST = dict(preset="tiny", batch_size=2, eval_batches=1, eval_every=0, warmup=1, threads=1, seq_len=64,
            steps=4, ckpt_every=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run and a run stopped at step 2 (checkpointed), on a small corpus."""
    from ressformer import data as D

    root = tmp_path_factory.mktemp("runs")
    data = root / "corpus.txt"
    data.write_text(D.default_corpus()[:30_000], encoding="utf-8")
    quiet = dict(log=lambda *a, **k: None)
    train(TrainConfig(**FAST, data=str(data), out=str(root / "full")), **quiet)
    train(TrainConfig(**FAST, data=str(data), out=str(root / "half"), stop_at=2), **quiet)
    return root, str(data)


def _losses(run: Path):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("step", [*CKPT_STEPS, "metrics-torn"])
def test_resumed_training_killed(runs, tmp_path, monkeypatch, dead_writer, step):
    root, data = runs
    run = tmp_path / "run"
    shutil.copytree(root / "half", run)
    tc = TrainConfig(**FAST, data=data, out=str(run), resume=str(run))
    logs = []
    if step == "metrics-torn":  # killed while appending a metrics line
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "loss": 5.1')
    else:
        monkeypatch.setattr(fsutil, "FAULT_HOOK", kill_at(step))
        with pytest.raises(Killed):
            train(tc, log=logs.append)  # killed while saving the step-4 checkpoint
        dead_writer()
    fsutil.recover(run / "ckpt")  # what the next run does first
    ck = json.loads((run / "ckpt" / "config.json").read_text())
    if step == "cleanup":  # the new checkpoint was complete: the run is done
        assert ck["train"]["step"] == 4
    else:
        assert ck["train"]["step"] == 2
        train(tc, log=logs.append)  # the next resume recovers and continues
    assert same_weights(run / "ckpt", root / "full" / "ckpt")
    if step != "cleanup":
        assert _losses(run) == _losses(root / "full")  # bitwise the uninterrupted run
    if step == "metrics-torn":
        assert any("torn last line" in m for m in logs)
    assert leftovers(run) == []


# ---- permissions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, fast_export, tiny_checkpoint, mask):
    old = os.umask(mask)
    try:
        ck = save_checkpoint(perturbed_model(), tmp_path / "ck")
        ex = fast_export.export_checkpoint(tiny_checkpoint, tmp_path / "ex", progress=lambda s: None)
        fsutil.write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    for folder in (ck, ex):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask, folder
        for f in folder.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask
