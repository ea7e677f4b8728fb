"""The bad-input catalogue (issue 14): every command and the Python API, given what a careful user
tries, answers with one clear line (exit 2: a usage error, 1: a failure; no traceback) and changes
nothing on disk (names, sizes, mtimes and hashes of every file around are compared before/after).

The table is built on the session fixtures `tiny_checkpoint` / `tiny_export` and bad copies of them;
no case trains or exports."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from ressformer.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ---- the world the cases run in ----------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def w(tiny_checkpoint, tiny_export, tmp_path_factory):
    """Inputs, good and bad, made once. Paths have spaces and non-ASCII names on purpose."""
    root = tmp_path_factory.mktemp("catalogue")
    d = SimpleNamespace(root=root, ck=tiny_checkpoint, ex=tiny_export, cwd=root / "cwd")
    d.cwd.mkdir()
    d.odd = root / "dossier à espaces ü"  # a valid parent folder with spaces and non-ASCII
    d.odd.mkdir()
    d.text = root / "texte court é.txt"
    d.text.write_text("To be, or not to be, that is the question.\n" * 500, encoding="utf-8")
    d.empty = root / "empty.txt"
    d.empty.write_bytes(b"")
    d.file = root / "a file.txt"  # a file where a folder is expected
    d.file.write_text("not a folder")
    d.folder = root / "a folder"  # a folder where a file is expected
    d.folder.mkdir()
    d.full = root / "full"  # a non-empty folder holding something precious
    d.full.mkdir()
    (d.full / "precious.txt").write_text("keep me")
    d.existing_json = root / "report.json"
    d.existing_json.write_text("{}")
    # checkpoints: truncated weights (hash recorded -> corrupted), truncated without a hash
    d.trunc = _copy(d.ck, root / "truncated ck")
    data = (d.trunc / "model.safetensors").read_bytes()
    (d.trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    d.trunc_nohash = _copy(d.trunc, root / "truncated-nohash")
    meta = json.loads((d.trunc_nohash / "config.json").read_text())
    meta.pop("sha256")
    (d.trunc_nohash / "config.json").write_text(json.dumps(meta))
    d.badcfg = _copy(d.ck, root / "bad-config ck")
    meta = json.loads((d.badcfg / "config.json").read_text())
    meta["config"]["n_heads"] = 0
    (d.badcfg / "config.json").write_text(json.dumps(meta))
    d.emptyck = root / "empty ck"
    d.emptyck.mkdir()
    # a run folder (as `train` leaves it) and a run holding an untrained checkpoint
    d.run = root / "run"
    _copy(d.ck, d.run / "ckpt")
    (d.run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.5}\n')
    # exports: a graph missing, sidecar `[]`, sidecar lacking a field, sidecar not JSON
    d.ex_nograph = _copy(d.ex, root / "ex-no-graph")
    meta = json.loads((d.ex / "ressformer.json").read_text())
    (d.ex_nograph / meta["graphs"][next(iter(meta["graphs"]))]["file"]).unlink()
    d.ex_list = _copy(d.ex, root / "ex-list")
    (d.ex_list / "ressformer.json").write_text("[]")
    d.ex_nofield = _copy(d.ex, root / "ex-nofield")
    (d.ex_nofield / "ressformer.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    d.ex_notjson = _copy(d.ex, root / "ex-notjson")
    (d.ex_notjson / "ressformer.json").write_text("{truncated")
    # issue 21: the editable `generation` section, null and out of its rules
    d.ex_gen_null = _copy(d.ex, root / "ex-gen-null")
    (d.ex_gen_null / "ressformer.json").write_text(json.dumps({**meta, "generation": None}))
    d.ex_gen_bad = _copy(d.ex, root / "ex-gen-bad")
    (d.ex_gen_bad / "ressformer.json").write_text(json.dumps({**meta, "generation": {"top_p": 1.5}}))
    return d


def snapshot(*roots) -> dict:
    """Every file and folder under roots: (size, mtime, sha256) - what 'nothing changed' means."""
    out = {}
    for r in roots:
        r = Path(r)
        for dirpath, dirs, files in os.walk(r):
            for n in dirs:
                p = Path(dirpath, n)
                out[str(p)] = ("dir", p.stat().st_mode)
            for n in files:
                p = Path(dirpath, n)
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---- the CLI table: (id, args(w), exit code, text the one error line must contain) -----------------
S = str
CLI = [
    # init
    ("init-preset", lambda w: ["init", S(w.odd / "ck"), "--preset", "tinyy"], 2, "unknown preset 'tinyy'"),
    ("init-n_heads-0", lambda w: ["init", S(w.odd / "ck"), "--set", "n_heads=0"], 2, "n_heads must be >= 1"),
    ("init-d_model-63", lambda w: ["init", S(w.odd / "ck"), "--set", "d_model=63"], 2, "divisible by n_heads"),
    ("init-negative", lambda w: ["init", S(w.odd / "ck"), "--set", "d_model=-64"], 2, "d_model must be >= 1"),
    ("init-segment-2.5", lambda w: ["init", S(w.odd / "ck"), "--set", "segment_len=2.5"], 2, "must be an integer"),
    ("init-unknown-field", lambda w: ["init", S(w.odd / "ck"), "--set", "no_such=1"], 2, "unknown config field"),
    ("init-set-no-value", lambda w: ["init", S(w.odd / "ck"), "--set", "top_k"], 2, "FIELD=VALUE"),
    ("init-set-nan", lambda w: ["init", S(w.odd / "ck"), "--set", "rope_base=NaN"], 2, "finite"),
    ("init-set-bool-type", lambda w: ["init", S(w.odd / "ck"), "--set", "shared=1"], 2, "true or false"),
    ("init-normalizer", lambda w: ["init", S(w.odd / "ck"), "--set", "normalizer=entmax"], 2, "normalizer"),
    ("init-nonempty-dir", lambda w: ["init", S(w.full)], 2, "already holds files"),
    ("init-existing-ckpt", lambda w: ["init", S(w.ck)], 2, "already holds a checkpoint"),
    ("init-file-as-dir", lambda w: ["init", S(w.file)], 2, "is a file"),
    ("init-parent-is-file", lambda w: ["init", S(w.file / "ck")], 1, "Not a directory"),
    ("init-seed-text", lambda w: ["init", S(w.odd / "ck"), "--seed", "abc"], 2, "abc"),
    ("init-threads-0", lambda w: ["init", S(w.odd / "ck"), "--threads", "0"], 2, "--threads must be >= 1"),
    # train
    ("train-steps-0", lambda w: ["train", S(w.text), "--steps", "0", "--out", S(w.odd / "r")], 2,
     "steps must be >= 1"),
    ("train-steps-neg", lambda w: ["train", "--steps", "-5", "--out", S(w.odd / "r")], 2, "steps must be >= 1"),
    ("train-lr-nan", lambda w: ["train", "--lr", "nan", "--out", S(w.odd / "r")], 2, "finite"),
    ("train-lr-neg", lambda w: ["train", "--lr", "-1", "--out", S(w.odd / "r")], 2, "--lr must be > 0"),
    ("train-batch-0", lambda w: ["train", "--batch-size", "0", "--out", S(w.odd / "r")], 2, "--batch-size"),
    ("train-preset", lambda w: ["train", "--preset", "huge", "--out", S(w.odd / "r")], 2, "unknown preset 'huge'"),
    ("train-set", lambda w: ["train", "--set", "n_heads=0", "--out", S(w.odd / "r")], 2, "n_heads"),
    ("train-missing-data", lambda w: ["train", S(w.root / "missing.txt"), "--out", S(w.odd / "r")], 2,
     "does not exist"),
    ("train-empty-data", lambda w: ["train", S(w.empty), "--out", S(w.odd / "r")], 2, "is empty"),
    ("train-existing-run", lambda w: ["train", S(w.text), "--steps", "2", "--out", S(w.run)], 2, "--resume"),
    ("train-out-file", lambda w: ["train", S(w.text), "--out", S(w.file)], 2, "is a file"),
    ("train-out-under-file", lambda w: ["train", S(w.text), "--out", S(w.file / "run")], 2, "is a file"),
    ("train-resume-missing", lambda w: ["train", "--resume", S(w.root / "nowhere")], 2, "does not exist"),
    ("train-resume-untrained", lambda w: ["train", S(w.text), "--resume", S(w.ck), "--out", S(w.odd / "r")], 2,
     "not a training checkpoint"),
    ("train-stop-at", lambda w: ["train", "--steps", "3", "--stop-at", "5", "--out", S(w.odd / "r")], 2,
     "--stop-at"),
    ("train-max-minutes-inf", lambda w: ["train", "--max-minutes", "inf", "--out", S(w.odd / "r")], 2, "finite"),
    ("train-min-lr-ratio", lambda w: ["train", "--min-lr-ratio", "2", "--out", S(w.odd / "r")], 2, "<= 1"),
    # evaluate, mqar
    ("evaluate-seq-len-0", lambda w: ["evaluate", S(w.ck), "--seq-len", "0"], 2, "--seq-len must be >= 1"),
    ("evaluate-missing", lambda w: ["evaluate", S(w.root / "nope")], 2, "does not exist"),
    ("evaluate-windows-neg", lambda w: ["evaluate", S(w.ck), "--windows", "-1"], 2, "--windows"),
    ("evaluate-json-folder", lambda w: ["evaluate", S(w.ck), "--json-out", S(w.folder)], 2, "is a directory"),
    ("evaluate-truncated", lambda w: ["evaluate", S(w.trunc)], 2, "corrupted"),
    ("evaluate-bad-config", lambda w: ["evaluate", S(w.badcfg)], 2, "n_heads must be >= 1"),
    ("mqar-pairs-0", lambda w: ["mqar", "--pairs", "0"], 2, "--pairs must be >= 1"),
    ("mqar-too-short", lambda w: ["mqar", "--seq-len", "4", "--pairs", "4"], 2, "too short"),
    ("mqar-json-exists", lambda w: ["mqar", "--json-out", S(w.existing_json)], 2, "--overwrite"),
    # export
    ("export-onto-itself", lambda w: ["export", S(w.ck), "--out", S(w.ck), "--overwrite"], 2, "overlaps"),
    ("export-inside-ckpt", lambda w: ["export", S(w.ck), "--out", S(w.ck / "sub")], 2, "overlaps"),
    ("export-around-ckpt", lambda w: ["export", S(w.ck), "--out", S(w.ck.parent), "--overwrite"], 2, "overlaps"),
    ("export-missing-ckpt", lambda w: ["export", S(w.root / "nope"), "--out", S(w.odd / "o")], 2, "does not exist"),
    ("export-file-as-ckpt", lambda w: ["export", S(w.file), "--out", S(w.odd / "o")], 2, "is a file"),
    ("export-dtype", lambda w: ["export", S(w.ck), "--out", S(w.odd / "o"), "--dtype", "int4"], 2,
     "unsupported dtype"),
    ("export-opset", lambda w: ["export", S(w.ck), "--out", S(w.odd / "o"), "--opset", "9"], 2, "--opset"),
    ("export-steps-0", lambda w: ["export", S(w.ck), "--out", S(w.odd / "o"), "--steps", "0"], 2, "--steps"),
    ("export-quantize", lambda w: ["export", S(w.ck), "--out", S(w.odd / "o"), "--quantize", "int2"], 2,
     "unsupported quantization"),
    ("export-nonempty-out", lambda w: ["export", S(w.ck), "--out", S(w.full)], 1, "not empty"),
    ("export-out-file", lambda w: ["export", S(w.ck), "--out", S(w.file)], 2, "is a file"),
    ("export-parent-is-file", lambda w: ["export", S(w.ck), "--out", S(w.file / "o")], 1, "cannot create"),
    ("export-truncated", lambda w: ["export", S(w.trunc), "--out", S(w.odd / "o")], 1, "corrupted"),
    ("export-truncated-nohash", lambda w: ["export", S(w.trunc_nohash), "--out", S(w.odd / "o")], 1,
     "cannot read model.safetensors"),
    ("export-empty-ckpt", lambda w: ["export", S(w.emptyck), "--out", S(w.odd / "o")], 1, "no config.json"),
    # parity
    ("parity-lengths-abc", lambda w: ["parity", S(w.ck), S(w.ex), "--lengths", "abc"], 2, "comma-separated"),
    ("parity-lengths-0", lambda w: ["parity", S(w.ck), S(w.ex), "--lengths", "0,4"], 2, ">= 1"),
    ("parity-batches-0", lambda w: ["parity", S(w.ck), S(w.ex), "--batches", "0"], 2, "--batches"),
    ("parity-provider", lambda w: ["parity", S(w.ck), S(w.ex), "--provider", "tpu"], 2, "unknown provider 'tpu'"),
    ("parity-truncated", lambda w: ["parity", S(w.trunc), S(w.ex)], 1, "corrupted"),
    ("parity-missing-graph", lambda w: ["parity", S(w.ck), S(w.ex_nograph)], 1, "missing"),
    ("parity-sidecar-list", lambda w: ["parity", S(w.ck), S(w.ex_list)], 1, "JSON object"),
    ("parity-json-in-input", lambda w: ["parity", S(w.ck), S(w.ex), "--json", S(w.ex / "p.json")], 2,
     "input"),
    ("parity-json-exists", lambda w: ["parity", S(w.ck), S(w.ex), "--json", S(w.existing_json)], 2,
     "--overwrite"),
    ("parity-json-parent-file", lambda w: ["parity", S(w.ck), S(w.ex), "--json", S(w.file / "p.json")], 2,
     "is a file"),
    ("parity-export-as-ckpt", lambda w: ["parity", S(w.ex), S(w.ex)], 1, "config.json"),
    # generate
    ("generate-top-k-300", lambda w: ["generate", S(w.ex), "--top-k", "-300"], 2, "--top-k must be an integer >= 0"),
    ("generate-top-k-1", lambda w: ["generate", S(w.ex), "--top-k", "-1"], 2, "--top-k must be an integer >= 0"),
    ("generate-temp-nan", lambda w: ["generate", S(w.ex), "--temperature", "nan"], 2, "finite"),
    ("generate-temp-inf", lambda w: ["generate", S(w.ex), "--temperature", "inf"], 2, "finite"),
    ("generate-temp-neg", lambda w: ["generate", S(w.ex), "--temperature", "-0.5"], 2, ">= 0"),
    ("generate-top-p-0", lambda w: ["generate", S(w.ex), "--top-p", "0"], 2, "--top-p must be in (0, 1]"),
    ("generate-top-p-1.5", lambda w: ["generate", S(w.ex), "--top-p", "1.5"], 2, "--top-p must be in (0, 1]"),
    ("generate-max-new-neg", lambda w: ["generate", S(w.ex), "--max-new-tokens", "-1"], 2, "--max-new-tokens"),
    ("generate-steps-0", lambda w: ["generate", S(w.ex), "--steps", "0"], 2, "--steps must be >= 1"),
    ("generate-stop-empty", lambda w: ["generate", S(w.ex), "--stop", ""], 2, "--stop"),
    ("generate-provider", lambda w: ["generate", S(w.ex), "--provider", "tpu"], 2, "unknown provider"),
    ("generate-rep-penalty", lambda w: ["generate", S(w.ex), "--repetition-penalty", "0"], 2,
     "--repetition-penalty"),
    ("generate-sidecar-list", lambda w: ["generate", S(w.ex_list)], 1, "JSON object"),
    ("generate-sidecar-nofield", lambda w: ["generate", S(w.ex_nofield)], 1, "has no 'config' entry"),
    ("generate-sidecar-notjson", lambda w: ["generate", S(w.ex_notjson)], 1, "corrupted"),
    ("generate-missing-graph", lambda w: ["generate", S(w.ex_nograph)], 1, "missing"),
    ("generate-file-as-dir", lambda w: ["generate", S(w.file)], 2, "is a file"),
    ("generate-missing-dir", lambda w: ["generate", S(w.odd / "nope ü")], 2, "does not exist"),
    ("generate-checkpoint", lambda w: ["generate", S(w.ck)], 1, "no ressformer.json"),
    # issue 21: the sidecar's generation section (every command), option rules, text that is not UTF-8
    ("generate-generation-null", lambda w: ["generate", S(w.ex_gen_null)], 1,
     "ressformer.json: generation must be a JSON object"),
    ("chat-generation-null", lambda w: ["chat", S(w.ex_gen_null)], 1, "ressformer.json: generation must be"),
    ("chat-generation-top-p", lambda w: ["chat", S(w.ex_gen_bad)], 1,
     "ressformer.json: generation.top_p must be in (0, 1]"),
    ("score-generation-top-p", lambda w: ["score", S(w.ex_gen_bad), S(w.text)], 1, "generation.top_p"),
    ("generate-seed-neg", lambda w: ["generate", S(w.ex), "--seed", "-1"], 2, "--seed must be an integer >= 0"),
    ("generate-prompt-not-utf8", lambda w: ["generate", S(w.ex), "--prompt", "a\udcff"], 2,
     "--prompt is not valid UTF-8 text (byte ff at character 1)"),
    ("generate-stop-not-utf8", lambda w: ["generate", S(w.ex), "--stop", "\udcfe"], 2, "--stop is not valid UTF-8"),
    ("chat-temp-neg", lambda w: ["chat", S(w.ex), "--temperature", "-1"], 2, "--temperature must be a finite"),
    # score
    ("score-empty-file", lambda w: ["score", S(w.ex), S(w.empty)], 1, "is empty"),
    ("score-folder-as-file", lambda w: ["score", S(w.ex), S(w.folder)], 2, "is a directory"),
    ("score-missing-file", lambda w: ["score", S(w.ex), S(w.root / "nope.txt")], 2, "does not exist"),
    ("score-no-files", lambda w: ["score", S(w.ex)], 2, "FILES"),
    ("score-sidecar-list", lambda w: ["score", S(w.ex_list), S(w.text)], 1, "JSON object"),
    ("score-steps-neg", lambda w: ["score", S(w.ex), S(w.text), "--steps", "-1"], 2, "--steps"),
    ("score-stdin-empty", lambda w: ["score", S(w.ex), "-"], 1, "standard input is empty: nothing to score"),
    ("train-stdin-empty", lambda w: ["train", "-", "--out", S(w.odd / "r")], 2, "data on standard input is empty"),
    # bench
    ("bench-nothing", lambda w: ["bench"], 2, "CHECKPOINT or --preset"),
    ("bench-preset", lambda w: ["bench", "--preset", "huge"], 2, "unknown preset 'huge'"),
    ("bench-missing", lambda w: ["bench", S(w.root / "nope")], 2, "does not exist"),
    ("bench-truncated", lambda w: ["bench", S(w.trunc)], 1, "corrupted"),
    ("bench-json-folder", lambda w: ["bench", "--preset", "tiny", "--json", S(w.folder)], 2, "is a directory"),
    ("bench-threads-0", lambda w: ["bench", "--preset", "tiny", "--threads", "0"], 2, "--threads"),
    # demo and the group
    ("demo-preset", lambda w: ["demo", "--preset", "tinyy"], 2, "unknown preset 'tinyy'"),
    ("demo-steps-0", lambda w: ["demo", "--steps", "0"], 2, "--steps must be >= 1"),
    ("demo-out-nonempty", lambda w: ["demo", "--out", S(w.full)], 2, "already holds files"),
    ("quiet-and-verbose", lambda w: ["--quiet", "--verbose", "init", S(w.odd / "ck")], 2, "not both"),
    ("unknown-command", lambda w: ["trian"], 2, "No such command"),
]
if os.geteuid() != 0:  # as root (CI containers) permissions cannot fail; the file-as-folder cases cover it
    CLI.append(("init-unwritable", lambda w: ["init", S(w.locked / "ck")], 1, "Permission denied"))


def error_line(result) -> str:
    """The single `error:` line of a failed command; fails the test on a traceback or several lines."""
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(w, case, monkeypatch, tmp_path):
    _, args, code, text = case
    if os.geteuid() != 0:
        w.locked = tmp_path / "locked"
        w.locked.mkdir(mode=0o500)
    monkeypatch.chdir(w.cwd)
    monkeypatch.delenv("RESSFORMER_DEBUG", raising=False)
    before = snapshot(w.root, w.ck, w.ex)
    r = CliRunner().invoke(main, args(w))
    line = error_line(r)
    assert r.exit_code == code, r.output
    assert text in line, line
    assert snapshot(w.root, w.ck, w.ex) == before, "the command changed files on disk"


def test_debug_shows_the_traceback(w, monkeypatch):
    monkeypatch.chdir(w.cwd)
    r = CliRunner().invoke(main, ["--debug", "generate", S(w.ex_nograph)])
    assert r.exit_code == 1 and "Traceback" in r.output and r.output.rstrip().splitlines()[-1].startswith("error:")
    monkeypatch.setenv("RESSFORMER_DEBUG", "1")
    r = CliRunner().invoke(main, ["export", S(w.trunc), "--out", S(w.odd / "o")])
    assert r.exit_code == 1 and "Traceback" in r.output


def test_torch_commands_without_torch_say_which_extra(w):
    """In a runtime-only install every torch-needing command stops with one line naming the extra;
    generate still works."""
    code = f"""
import sys
BLOCKED = ('torch', 'safetensors', 'onnx', 'onnxscript')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import ressformer.cli as cli
from click.testing import CliRunner
for args in (['train', '--steps', '1'], ['init', {S(w.odd / 'x')!r}], ['export', {S(w.ck)!r}, '--out', 'o'],
             ['parity', {S(w.ck)!r}, {S(w.ex)!r}], ['bench', '--preset', 'tiny'], ['evaluate', {S(w.ck)!r}],
             ['mqar'], ['demo']):
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 1, (args, r.output)
    want = "error: `ressformer " + args[0] + "` needs the torch extra: pip install torch==2.13.0 && pip install"
    assert r.output.strip().startswith(want) and len(r.output.strip().splitlines()) == 1, r.output
r = CliRunner().invoke(cli.main, ['generate', {S(w.ex)!r}, '--max-new-tokens', '3', '--seed', '0'])
assert r.exit_code == 0, r.output
bad = [m for m in sys.modules if m.split('.')[0] in BLOCKED]
assert not bad, bad
print('ok')
"""
    before = snapshot(w.root, w.ck, w.ex)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=w.cwd)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert snapshot(w.root, w.ck, w.ex) == before


# ---- the Python API -------------------------------------------------------------------------------
def _api_cases():
    from ressformer.export.exporter import export_checkpoint
    from ressformer.runtime import ModelError, ReSSFormerSession

    from ressformer import ReSSFormerConfig, load_checkpoint, save_checkpoint
    from ressformer.checkpoint import CheckpointError
    from ressformer.train import TrainConfig, read_metrics, train

    quiet = dict(log=lambda *a, **k: None)
    sess = {}

    def session(w):
        if "s" not in sess:
            sess["s"] = ReSSFormerSession(w.ex, threads=1)
        return sess["s"]

    def state(w, **fields):
        from dataclasses import replace

        s = session(w).init_state()
        return replace(s, **{k: f(s) for k, f in fields.items()})

    nan_state = lambda w: state(w, memory=lambda s: np.full_like(s.memory, np.nan))  # noqa: E731
    f64_state = lambda w: state(w, conv=lambda s: s.conv.astype(np.float64))  # noqa: E731
    pos_state = lambda w: state(w, pos=lambda s: 3)  # noqa: E731

    def bad_metrics(w):
        p = w.cwd / "m.jsonl"  # made inside the call's scratch folder
        p.write_text('{"step": 1}\n{torn\n{"step": 3}\n')
        try:
            read_metrics(p)
        finally:
            p.unlink()

    return [
        ("config-n_heads-0", lambda w: ReSSFormerConfig(n_heads=0), ValueError, "n_heads must be >= 1"),
        ("config-divisible", lambda w: ReSSFormerConfig(d_model=63), ValueError, "divisible"),
        ("config-float-int", lambda w: ReSSFormerConfig(segment_len=2.5), ValueError, "must be an integer"),
        ("config-str-int", lambda w: ReSSFormerConfig(d_ff="128"), ValueError, "must be an integer"),
        ("config-nan", lambda w: ReSSFormerConfig(init_std=math.nan), ValueError, "finite"),
        ("config-preset", lambda w: ReSSFormerConfig.preset("tinyy"), ValueError, "unknown preset"),
        ("config-from-list", lambda w: ReSSFormerConfig.from_dict([]), TypeError, "JSON object"),
        ("config-unknown-field", lambda w: ReSSFormerConfig.from_dict({"nope": 1}), ValueError, "unknown field"),
        ("load-file", lambda w: load_checkpoint(w.file), CheckpointError, "is a file"),
        ("load-truncated", lambda w: load_checkpoint(w.trunc), CheckpointError, "corrupted"),
        ("load-truncated-nohash", lambda w: load_checkpoint(w.trunc_nohash), CheckpointError, "cannot read"),
        ("load-bad-config", lambda w: load_checkpoint(w.badcfg), CheckpointError, "bad config"),
        ("save-no-overwrite", lambda w: save_checkpoint(load_checkpoint(w.ck), w.ck, overwrite=False),
         FileExistsError, "already exists"),
        ("save-onto-file", lambda w: save_checkpoint(load_checkpoint(w.ck), w.file), CheckpointError, "is a file"),
        ("export-onto-itself", lambda w: export_checkpoint(w.ck, w.ck, overwrite=True, progress=None),
         ValueError, "overlaps"),
        ("export-around", lambda w: export_checkpoint(w.ck, w.ck.parent, overwrite=True, progress=None),
         ValueError, "overlaps"),
        ("export-steps-0", lambda w: export_checkpoint(w.ck, w.odd / "o", steps=0, progress=lambda s: None),
         ValueError, "steps"),
        ("export-opset", lambda w: export_checkpoint(w.ck, w.odd / "o", opset=9), ValueError, "unsupported opset"),
        ("session-list-sidecar", lambda w: ReSSFormerSession(w.ex_list), ModelError, "JSON object"),
        ("session-missing-graph", lambda w: ReSSFormerSession(w.ex_nograph), ModelError, "missing"),
        ("forward-float-ids", lambda w: session(w).forward(np.array([[1.0, 2.0]])), TypeError, "integer"),
        ("forward-3d-ids", lambda w: session(w).forward(np.zeros((1, 2, 3), np.int64)), ValueError, "shape"),
        ("forward-1d-ids", lambda w: session(w).forward(np.zeros(3, np.int64)), ValueError, "shape"),
        ("forward-negative-id", lambda w: session(w).forward(np.array([[-1]])), ValueError, "out of range"),
        ("forward-str-ids", lambda w: session(w).forward([["a"]]), TypeError, "integer"),
        ("forward-empty", lambda w: session(w).forward(np.zeros((1, 0), np.int64)), ValueError, "empty"),
        ("forward-out-of-vocab", lambda w: session(w).forward(np.array([[300]])), ValueError, "300"),
        ("generate-top-k-neg", lambda w: list(session(w).generate("a", max_new_tokens=2, top_k=-1)),
         ValueError, "top_k"),
        ("generate-temp-nan", lambda w: list(session(w).generate("a", max_new_tokens=2, temperature=math.nan)),
         ValueError, "temperature"),
        ("generate-steps-0", lambda w: list(session(w).generate("a", max_new_tokens=2, steps=0)),
         ValueError, "steps"),
        # issue 21
        ("session-generation-null", lambda w: ReSSFormerSession(w.ex_gen_null), ModelError,
         "ressformer.json: generation must be a JSON object"),
        ("generate-seed-neg", lambda w: list(session(w).generate("a", max_new_tokens=1, seed=-1)), ValueError,
         "seed must be an integer >= 0"),
        ("generate-prompt-not-utf8", lambda w: list(session(w).generate("\udcff", max_new_tokens=1)), ValueError,
         "prompt is not valid UTF-8"),
        ("generate-batch-str", lambda w: list(session(w).generate_batch("text", max_new_tokens=1)), TypeError,
         "list of prompts"),
        ("forward-logits-first", lambda w: session(w).forward(np.array([[1]]), logits="first"), ValueError,
         "logits must be 'all' or 'last'"),
        ("forward-state-nan", lambda w: session(w).forward(np.array([[1]]), nan_state(w)), ValueError,
         "state.memory holds NaN"),
        ("forward-state-float64", lambda w: session(w).forward(np.array([[1]]), f64_state(w)), TypeError,
         "state.conv must be float32"),
        ("forward-state-pos", lambda w: session(w).forward(np.array([[1]]), pos_state(w)), ValueError,
         "state.past_k must have shape"),
        ("train-steps-0", lambda w: train(TrainConfig(steps=0, out=str(w.odd / "r")), **quiet), ValueError,
         "steps must be >= 1"),
        ("train-lr-nan", lambda w: train(TrainConfig(lr=math.nan, out=str(w.odd / "r")), **quiet), ValueError,
         "lr must be positive"),
        ("train-existing-run", lambda w: train(TrainConfig(steps=2, out=str(w.run)), **quiet), ValueError,
         "already holds a run"),
        ("metrics-bad-middle-line", bad_metrics, ValueError, "line 2"),
    ]


API = _api_cases()


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_bad_input(w, case, monkeypatch):
    _, call, err, match = case
    monkeypatch.chdir(w.cwd)
    before = snapshot(w.root, w.ck, w.ex)
    with pytest.raises(err, match=match):
        call(w)
    assert snapshot(w.root, w.ck, w.ex) == before, "the call changed files on disk"


def test_catalogue_size():
    assert len(CLI) + len(API) >= 60


def test_every_option_has_help_and_choices_are_choices():
    import click

    ctx = click.Context(main)
    names = main.list_commands(ctx)
    assert {"init", "train", "export", "parity", "generate", "score", "bench", "evaluate", "mqar", "demo"} <= set(names)
    for name in names:
        cmd = main.get_command(ctx, name)
        opts = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
        assert all(p.help for p in opts.values()), (name, [n for n, p in opts.items() if not p.help])
        assert "threads" in opts, name  # every command computes
        for choice in ("preset", "provider", "dtype"):
            if choice in opts:
                assert isinstance(opts[choice].type, click.Choice), (name, choice)


def test_the_suggested_fix_works(tmp_path, monkeypatch):
    """`init` refuses an existing checkpoint; with the --overwrite it suggests, the checkpoint is
    replaced (atomically), with no debris and the umask's modes."""
    from ressformer import load_checkpoint

    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ü ck"
    assert CliRunner().invoke(main, ["-q", "init", S(ck), "--seed", "1"]).exit_code == 0
    r = CliRunner().invoke(main, ["init", S(ck), "--seed", "2"])
    assert r.exit_code == 2 and "--overwrite" in error_line(r)
    r = CliRunner().invoke(main, ["-q", "init", S(ck), "--seed", "2", "--overwrite"])
    assert r.exit_code == 0 and r.output.startswith("wrote")
    assert json.loads((ck / "config.json").read_text())["seed"] == 2 and load_checkpoint(ck) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ü ck"]
