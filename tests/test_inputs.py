"""Every input gets a sane answer (issue 21): no wrong output, memory bounded in the prompt, one
message style in Python and JavaScript.

- the sampling rules: one table (`RULES`, runtime/sampling.py = `SAMPLING_RULES`, runtime/js), the
  same decisions in both runtimes, finite probabilities at every accepted extreme;
- the sidecar's `generation` section: one check for every command and both runtimes;
- file arguments from standard input, FIFOs and process substitution;
- chat: a bad line is refused alone; a long line is fed in pieces keeping only the last logits
  (peak memory measured); `forward(logits="last")`;
- readers recover an interrupted replacement (Python session and CLI, the Node runtime);
- hand-edited `RuntimeState`, a bare string for a list of prompts, a prompt that is not UTF-8;
- property-based tests (hypothesis) over the runtime's public API and the sidecar parser;
- the cross-runtime table: the same bad inputs to `ressformer generate` and `node cli.mjs` give the
  same exit code and equivalent one-line messages.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ressformer.runtime import ModelError, ReSSFormerSession
from ressformer.runtime.sampling import RULES, penalize, rule_error, sample
from ressformer.runtime.sidecar import GENERATION_FALLBACK, check_generation, read_sidecar

from ressformer.cli import main

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "runtime" / "js"
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _node() -> str:
    node = shutil.which("node")
    assert node, "Node.js 20+ is needed for the JavaScript runtime's tests (docs/javascript.md)"
    assert (JS / "node_modules" / "onnxruntime-node").is_dir(), "run `cd runtime/js && npm ci`"
    return node


def node_eval(code: str, data=None):
    """Run an ES module snippet in runtime/js with `input` (JSON) bound; it prints JSON, returned parsed."""
    src = "import * as R from './ressformer.mjs';\nconst input = JSON.parse(process.argv[1]);\n" + code
    r = subprocess.run([_node(), "--input-type=module", "-e", src, json.dumps(data)], cwd=JS, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def sess(tiny_export):
    return ReSSFormerSession(tiny_export, threads=1)


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _with_sidecar(src, dst, **fields) -> Path:
    """A copy of the export whose sidecar has `fields` set (generation only: the model hash still holds)."""
    d = _copy(src, dst)
    meta = json.loads((d / "ressformer.json").read_text())
    meta.update(fields)
    (d / "ressformer.json").write_text(json.dumps(meta, indent=2))
    return d


# ---- 1. the sampling rules: one table, both runtimes ------------------------------------------------
def _expected_ok(name, value) -> bool:
    """RULES read as a specification, independently of rule_error."""
    r = RULES[name]
    if value is None:
        return name == "seed"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if r["type"] == "integer" and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    above = value > r["min"] if r["min_open"] else value >= r["min"]
    return above and (r["max"] is None or value <= r["max"])


def _table_cases():
    out = []
    for name, r in RULES.items():
        lo, hi = r["min"], r["max"]
        vals = [lo, lo - 1, lo + 1, 1, 0, -1, 2, 1.5, 5e-324, 1e-300, 1e300, float("inf"), float("nan"), True, "1",
                None, 10**6]
        if hi is not None:
            vals += [hi, hi + 1e-9, hi - 1e-9]
        out += [(name, v) for v in vals]
    return out


def _js_value(v):
    return {"special": repr(v)} if isinstance(v, float) and not math.isfinite(v) else v


def test_rules_table_is_one_table_in_python_and_javascript():
    js = node_eval("console.log(JSON.stringify(R.SAMPLING_RULES));")
    assert js == RULES


def test_both_runtimes_accept_and_refuse_what_the_table_says():
    cases = _table_cases()
    js = node_eval("""
const v = (x) => (x !== null && typeof x === 'object' ? { 'inf': Infinity, 'nan': NaN }[x.special] : x);
console.log(JSON.stringify(input.map(([name, x]) => R.ruleError(name, v(x), name))));
""", [[n, _js_value(v)] for n, v in cases])
    for (name, v), js_msg in zip(cases, js):
        py_msg = rule_error(name, v)
        assert (py_msg is None) == _expected_ok(name, v), (name, v, py_msg)
        assert (js_msg is None) == (py_msg is None), (name, v, py_msg, js_msg)
        if py_msg:  # the same words up to the value's spelling
            assert py_msg.split(", got")[0] == js_msg.split(", got")[0] == f"{name} must be {RULES[name]['must']}"


class _U:
    """A generator that returns fixed uniforms (the JS sampler takes u directly)."""

    def __init__(self, u):
        self.u = u

    def random(self, shape):
        return np.full(shape, self.u)


EXTREMES = [dict(temperature=t, top_k=k, top_p=p, penalty=r)
            for t in (5e-324, 1e-300, 1e-30, 1.0, 1e300, 1.7e308) for k in (0, 1, 256, 10**9)
            for p in (5e-324, 1.0) for r in (5e-324, 1.0, 1.7e308)]


def test_accepted_extremes_give_finite_probabilities_and_the_same_tokens_in_both_runtimes():
    """Tiny positive values passed the old validation and made every generated byte 0x00 (NaN
    probabilities). Now a tiny temperature or top-p picks the most probable token, the same in
    Python and JavaScript, and nothing is NaN."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(256) * 3).astype(np.float32)
    logits[[7, 200]] = logits.max() + 1  # two tied maxima: lowest id on ties where the rule says so
    seen = list(range(0, 256, 3))
    cases, want = [], []
    for c in EXTREMES:
        for u in (0.0, 0.3, 0.999999):
            z = penalize(logits[None], [set(seen)], c["penalty"]) if c["penalty"] != 1 else logits[None]
            assert np.isfinite(z).all(), c
            with np.errstate(invalid="raise", divide="raise"):  # no NaN, no 0 / 0
                tok = int(sample(z, _U(u), c["temperature"], c["top_k"], c["top_p"])[0])
            assert 0 <= tok < 256
            best = np.flatnonzero(z[0] == z[0].max())  # the tied maxima (7 and 200, or seen tokens at F32_MAX)
            if c["temperature"] <= 1e-30 or c["top_k"] == 1:
                assert tok in best, (c, u, tok)
            if c["top_p"] < 1e-300 and c["temperature"] <= 1:  # (huge temperatures: uniform, so id 0)
                assert tok == best[0], (c, u, tok)  # the most probable token, lowest id on ties
            cases.append({**c, "u": u})
            want.append(tok)
    got = node_eval("""
const out = input.cases.map((c) => {
  const z = c.penalty !== 1 ? R.penalize(Float32Array.from(input.logits), new Set(input.seen), c.penalty)
    : Float32Array.from(input.logits);
  return R.sampleToken(z, c.u, { temperature: c.temperature, topK: c.top_k, topP: c.top_p });
});
console.log(JSON.stringify(out));
""", {"logits": logits.tolist(), "seen": seen, "cases": cases})
    assert got == want
    assert len(set(want)) > 2, "not all one token: sampling still samples"


@HYP
@given(logits=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40)),
                         elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       temperature=st.floats(0, 1e308), top_k=st.integers(0, 10**9), top_p=st.floats(0, 1, exclude_min=True),
       penalty=st.floats(0, 1e308, exclude_min=True), u=st.floats(0, 1, exclude_max=True))
def test_sampling_never_leaves_the_vocabulary_or_the_argmax_at_temperature_0(logits, temperature, top_k, top_p,
                                                                              penalty, u):
    z = penalize(logits, [set(range(0, logits.shape[1], 2))] * logits.shape[0], penalty)
    assert np.isfinite(z).all()
    tok = sample(z, _U(u), temperature, top_k, top_p)
    assert tok.shape == (logits.shape[0],) and ((tok >= 0) & (tok < logits.shape[1])).all()
    if temperature == 0:
        assert (tok == z.argmax(-1)).all()


@HYP
@given(name=st.sampled_from(sorted(RULES)),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20), st.booleans(),
                       st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)))
def test_rule_error_is_the_table(name, value):
    msg = rule_error(name, value, "--x")
    assert (msg is None) == _expected_ok(name, value)
    assert msg is None or msg.startswith(f"--x must be {RULES[name]['must']}, got ")


# ---- 2. the sidecar: one check, naming the file and field --------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=4), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


@HYP
@given(gen=st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from([*GENERATION_FALLBACK, "seed", "temprature"]),
                                                  JSON_VALUES | st.floats(0, 2), max_size=4)))
def test_the_generation_section_is_valid_or_refused_by_field(gen):
    try:
        g = check_generation(gen, "x/ressformer.json")
    except ModelError as e:
        assert str(e).startswith("x/ressformer.json: generation"), e
        return
    assert set(g) == set(GENERATION_FALLBACK)
    assert all(rule_error(k, v) is None for k, v in g.items() if k != "stop")
    assert all(isinstance(s, str) for s in g["stop"])


@HYP
@given(field=st.sampled_from(["format", "format_version", "ressformer_opset", "config", "graphs", "steps",
                              "tokenizer", "unrolled", "model_sha256", "generation"]), value=JSON_VALUES)
def test_any_sidecar_edit_is_read_or_refused_in_one_line(tiny_export, tmp_path_factory, field, value):
    d = tmp_path_factory.mktemp("sc")  # read_sidecar opens no graph: the sidecar alone is enough
    meta = json.loads((tiny_export / "ressformer.json").read_text())
    meta[field] = value
    (d / "ressformer.json").write_text(json.dumps(meta))
    try:
        read_sidecar(d)
    except ModelError as e:
        assert "ressformer.json" in str(e) and "\n" not in str(e)


@pytest.mark.parametrize("gen,text", [
    (None, "generation must be a JSON object"), ([], "generation must be a JSON object"),
    ("greedy", "generation must be a JSON object"),
    ({"temperature": -1}, "generation.temperature must be a finite number >= 0"),
    ({"top_p": 0}, "generation.top_p must be in (0, 1]"), ({"top_k": 2.5}, "generation.top_k must be an integer"),
    ({"stop": "\n"}, "generation.stop must be a list of strings"),
    ({"tempreature": 0.5}, "generation.tempreature is not a generation option"),
])
def test_every_command_and_both_runtimes_check_the_generation_section(tiny_export, tmp_path, gen, text):
    d = _with_sidecar(tiny_export, tmp_path / "ex", generation=gen)
    with pytest.raises(ModelError, match=f"ressformer.json: {text}".replace("(", r"\(").replace(")", r"\)")):
        ReSSFormerSession(d)
    for args in (["generate", str(d), "--max-new-tokens", "2"], ["chat", str(d)],
                 ["generate", str(d), "--interactive"]):
        r = CliRunner().invoke(main, args, input="hi\n")
        assert r.exit_code == 1 and f"ressformer.json: {text}" in r.stderr.strip().splitlines()[-1], (args, r.output)
    js = subprocess.run([_node(), str(JS / "cli.mjs"), str(d), "--max-new-tokens", "2"], capture_output=True,
                        text=True, timeout=120)
    assert js.returncode == 1 and js.stderr.count("\n") == 1 and f"ressformer.json: {text}" in js.stderr, js.stderr


# ---- 3. file arguments: standard input, FIFOs, process substitution -----------------------------------
def test_score_reads_stdin_fifos_and_process_substitution(tiny_export, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("To be, or not to be, that is the question. " * 40)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    q = lambda p: "'" + str(p) + "'"  # noqa: E731
    run = f"{q(sys.executable)} -m ressformer.cli -q score {q(tiny_export)} --json"
    outs = {}
    for name, cmd in [("file", f"{run} {q(f)}"), ("stdin", f"cat {q(f)} | {run} -"),
                      ("procsub", f"{run} <(cat {q(f)})"), ("fifo", f"(cat {q(f)} > {q(fifo)} &); {run} {q(fifo)}")]:
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (name, r.stderr)
        outs[name] = next(iter(json.loads(r.stdout).values()))
    assert {o["bytes"] for o in outs.values()} == {f.stat().st_size}
    assert len({o["bits_per_byte"] for o in outs.values()}) == 1, outs
    r = subprocess.run(["bash", "-c", f": | {run} -"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: standard input is empty: nothing to score"


def test_training_data_from_stdin_and_a_fifo(tmp_path, monkeypatch):
    import io

    from ressformer.data import DataError, load_text

    text = "Hamlet: to be or not to be.\n" * 10
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert load_text("-") == text
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(DataError, match="data on standard input is empty"):
        load_text("-")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_text(text))
    t.start()
    assert load_text(fifo) == text
    t.join()


# ---- 4. chat: a bad line is refused alone; memory bounded in the line's length --------------------------
def test_a_bad_line_gets_a_message_and_the_chat_goes_on(tiny_export):
    r = CliRunner().invoke(main, ["chat", str(tiny_export), "--max-new-tokens", "4", "--temperature", "0"],
                           input=b"hello\n\xff\xfe bad\nworld\n")
    assert r.exit_code == 0, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "line 2 is not valid UTF-8" in errors[0] and "goes on" in errors[0]
    assert "chat ended: 2 turns" in r.stdout


def test_a_long_bad_line_is_refused_at_its_byte_and_leaves_the_conversation_as_it_was(tiny_export):
    """The line is read and fed in pieces; a bad byte 40,001 bytes in (past two pieces already fed)
    puts the state back: the chat goes on exactly as if the line had not been typed."""
    args = ["chat", str(tiny_export), "--max-new-tokens", "6", "--temperature", "0"]
    bad = CliRunner().invoke(main, args, input=b"hello\n" + b"a" * 40000 + b"\xff\n" + b"world\n")
    good = CliRunner().invoke(main, args, input=b"hello\nworld\n")
    assert bad.exit_code == good.exit_code == 0
    assert "error: line 2 is not valid UTF-8 text (byte ff at byte 40001)" in bad.stderr
    assert bad.stdout == good.stdout


def test_forward_can_keep_only_the_last_logits(sess):
    x = np.random.default_rng(1).integers(0, 256, (2, 75))  # crosses two segment ends
    for path in ("unrolled", "steps"):
        full, s1 = sess.forward(x, path=path)
        last, s2 = sess.forward(x, path=path, logits="last")
        assert last.shape == (2, 1, 256)
        np.testing.assert_array_equal(last[:, 0], full[:, -1])
        np.testing.assert_array_equal(s1.memory, s2.memory)
    with pytest.raises(ValueError, match="logits must be 'all' or 'last'"):
        sess.forward(x, logits="first")


def test_a_long_chat_line_is_fed_in_pieces_and_replies_as_generate_does(sess, monkeypatch):
    from ressformer.deploy_cli import Chat

    line = "the quick brown fox " * 2000  # 40,000 bytes: three pieces
    calls = []
    forward = sess.forward

    def spy(tokens, *a, **kw):
        calls.append((np.shape(tokens)[1], kw.get("logits", "all")))
        return forward(tokens, *a, **kw)

    chat = Chat(sess, max_new_tokens=12, temperature=0, stop=["\x00\x01"])
    monkeypatch.setattr(sess, "forward", spy)
    reply = "".join(chat.reply(line))
    monkeypatch.undo()
    feed = [c for c in calls if c[1] == "last"]  # the line (and its newline); the reply feeds T = 1 tokens
    assert sum(n for n, _ in feed) == len(line) + 1 and all(n <= Chat.PIECE for n, _ in feed)
    assert all(n == 1 for n, _ in calls[len(feed):])
    assert reply == "".join(sess.generate_text(line + "\n", max_new_tokens=12, temperature=0))


def _peak_rss_kib(line_bytes: int, export, tmp_path) -> int:
    f = tmp_path / f"line{line_bytes}.txt"
    f.write_bytes(b"abcdefgh ij" * (line_bytes // 11) + b"\n")
    code = (f"import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdin=open({str(f)!r}), "
            "stdout=subprocess.DEVNULL, check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "ressformer.cli", "-q", "chat", str(export),
                        "--max-new-tokens", "4", "--seed", "0", "--threads", "1"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_chat_memory_does_not_grow_with_the_line(tiny_export, tmp_path):
    """A 200 KB line used to keep (T, 256) float32 logits twice (~400 MB); now it peaks within 10%
    of a 1 KB line (docs/reliability.md has the 1 MB measurement)."""
    small, big = _peak_rss_kib(1_000, tiny_export, tmp_path), _peak_rss_kib(200_000, tiny_export, tmp_path)
    assert big <= small * 1.10, (small, big)


# ---- 5. readers recover an interrupted replacement ---------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_readers_restore_the_backup_an_interrupted_export_left(tiny_export, tmp_path):
    """`export --overwrite` killed between its two renames leaves only `.NAME.old-PID`: the session,
    the CLI and the Node runtime put it back and read it (ressformer/fsutil.py's rule)."""
    for reader in ("session", "cli", "node"):
        ex = tmp_path / f"ex-{reader}"
        _copy(tiny_export, tmp_path / f".ex-{reader}.old-{_dead_pid()}")
        if reader == "session":
            assert ReSSFormerSession(ex).fingerprint
        elif reader == "cli":
            r = CliRunner().invoke(main, ["generate", str(ex), "--max-new-tokens", "2", "--seed", "0"])
            assert r.exit_code == 0, r.output
        else:
            r = subprocess.run([_node(), str(JS / "cli.mjs"), str(ex), "--max-new-tokens", "2", "--seed", "0"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        assert ex.is_dir() and not list(tmp_path.glob(f".ex-{reader}.old-*"))
    live = tmp_path / f".ex-live.old-{os.getpid()}"  # a running writer's backup is its own
    _copy(tiny_export, live)
    with pytest.raises(ModelError, match="does not exist"):
        ReSSFormerSession(tmp_path / "ex-live")
    assert live.is_dir()


def test_checkpoint_folder_arguments_restore_a_backup(tiny_checkpoint, tmp_path):
    from ressformer.cli import Folder

    _copy(tiny_checkpoint, tmp_path / f".ck.old-{_dead_pid()}")
    assert Folder().convert(str(tmp_path / "ck"), None, None) == str(tmp_path / "ck")
    assert (tmp_path / "ck" / "config.json").is_file()


# ---- 6. the Python API: states, prompts ----------------------------------------------------------------
def _bad_states(s):
    import onnxruntime as ort

    f = np.float32
    yield "dtype", replace(s, conv=s.conv.astype(np.float64)), TypeError, "state.conv must be float32"
    yield "shape", replace(s, memory=s.memory[:, :1]), ValueError, "state.memory must have shape"
    yield "pos", replace(s, pos=s.pos + 1), ValueError, "state.past_k holds 8 keys/values of the segment but pos 41"
    yield "past-capacity", replace(s, past_k=s.past_k[..., :4, :]), ValueError, "state.past_k must have shape"
    yield "past-ortvalue", replace(s, past_k=ort.OrtValue.ortvalue_from_numpy(s.past_k)), TypeError, \
        "state.past_k must be a float32 numpy array"
    yield "pos-negative", replace(s, pos=-1), ValueError, "state.pos must be an integer >= 0"
    yield "pos-float", replace(s, pos=3.0), ValueError, "state.pos must be an integer"
    yield "cache_valid", replace(s, cache_valid=5), ValueError, "state.cache_valid must be"
    yield "nan", replace(s, memory=np.full_like(s.memory, np.nan)), ValueError, "state.memory holds NaN"
    yield "inf", replace(s, conv=np.full(s.conv.shape, np.inf, f)), ValueError, "state.conv holds NaN or infinite"
    yield "list", replace(s, cache_k=s.cache_k.tolist()), TypeError, "state.cache_k must be a float32 array"
    yield "mem_k-on-steps", replace(s, path="steps"), ValueError, "steps path"


def test_a_hand_edited_state_is_refused_naming_the_field(sess):
    _, s = sess.forward(np.arange(40)[None] % 256)  # past one segment end: caches valid
    for name, bad, err, text in _bad_states(s):
        with pytest.raises(err, match=text.replace("(", r"\(")):
            sess.forward(np.array([[1]]), bad, path=bad.path)
        assert name


def test_only_states_not_made_by_the_session_are_validated(sess, monkeypatch):
    """A state this session returned is frozen and skips the per-token checks (their finiteness scans are
    the costly part); a copy or an edit of it, or a state from another session, is checked."""
    from ressformer.runtime import ReSSFormerSession

    _, s = sess.forward(np.arange(40)[None] % 256)
    calls = []
    real = sess._validate_state
    monkeypatch.setattr(sess, "_validate_state", lambda st: calls.append(st) or real(st))
    a, s2 = sess.forward(np.array([[7]]), s)
    assert calls == []
    b, _ = sess.forward(np.array([[7]]), replace(s))  # a copy: the same values, checked
    assert len(calls) == 1 and np.array_equal(a, b)
    other = ReSSFormerSession(sess.dir, threads=1)
    monkeypatch.setattr(other, "_validate_state", lambda st: calls.append(st) or real(st))
    other.forward(np.array([[7]]), s2)
    assert len(calls) == 2


def test_states_held_as_ortvalues_are_validated_too(sess):
    """On CUDA a state's tensors are OrtValues: the same checks read their dtype and shape (here on CPU)."""
    import onnxruntime as ort

    x = np.arange(40)[None] % 256
    _, s = sess.forward(x)
    fields = ("conv", "memory", "mem_k", "mem_v", "cache_k", "cache_v")  # the past buffers are host arrays
    held = replace(s, **{f: ort.OrtValue.ortvalue_from_numpy(getattr(s, f)) for f in fields})
    np.testing.assert_array_equal(sess.forward(np.array([[5]]), held)[0], sess.forward(np.array([[5]]), s)[0])
    bad = replace(held, conv=ort.OrtValue.ortvalue_from_numpy(s.conv.astype(np.float64)))
    with pytest.raises(TypeError, match="state.conv must be float32"):
        sess.forward(np.array([[5]]), bad)
    with pytest.raises(ValueError, match="state.memory must have shape"):
        sess.forward(np.array([[5]]), replace(held, memory=ort.OrtValue.ortvalue_from_numpy(s.memory[:, :1].copy())))


@HYP
@given(pos=st.integers(-5, 200), valid=st.sampled_from([0, 8, 16, -1]))
def test_any_edited_position_is_accepted_only_if_consistent(sess, pos, valid):
    _, s = sess.forward(np.arange(40)[None] % 256)
    bad = replace(s, pos=pos, cache_valid=valid)
    try:
        sess.forward(np.array([[1]]), bad)
    except ValueError as e:
        assert str(e).startswith("state.")
    else:
        assert pos % sess.segment_len == 40 % sess.segment_len  # the past's length
        assert valid == (sess.cache_len if pos >= sess.segment_len else 0)


@HYP
@given(tokens=st.tuples(hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
                                   elements=st.integers(-3, 300)),
                        st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.bool_])).map(
                            lambda t: t[0].astype(t[1])) | st.lists(st.text(max_size=2), max_size=2))
def test_forward_answers_any_tokens_with_logits_or_a_clear_error(sess, tokens):
    try:
        logits, s = sess.forward(tokens)
    except (ValueError, TypeError) as e:
        assert "onnxruntime" not in type(e).__module__ and str(e)
        return
    assert logits.shape == (*np.shape(tokens), 256) and np.isfinite(logits).all()


@HYP
@given(prompts=st.one_of(st.text(max_size=5), st.binary(max_size=5),
                         st.lists(st.text(max_size=4) | st.lists(st.integers(-2, 300), max_size=4), max_size=3)),
       temperature=st.floats(0, 1e308) | st.just(-1.0), top_p=st.floats(0, 1), seed=st.integers(-1, 3) | st.none())
def test_generate_batch_answers_any_prompts_with_tokens_or_a_clear_error(sess, prompts, temperature, top_p, seed):
    try:
        rows = list(sess.generate_batch(prompts, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=seed))
    except (ValueError, TypeError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert all(((r >= 0) & (r < 256)).all() for r in rows)


def test_a_text_stop_sequence_is_its_utf8_bytes(sess):
    full = bytes(sess.generate("ab", seed=3, max_new_tokens=40))
    first_ascii = next(b for b in full if b < 128)
    ids = list(sess.generate("ab", seed=3, max_new_tokens=40, stop=[chr(first_ascii)]))
    assert bytes(ids) == full[: full.index(first_ascii) + 1]
    with pytest.raises(ValueError, match="stop is not valid UTF-8"):
        list(sess.generate("ab", max_new_tokens=1, stop=["\udcff"]))


def test_a_bare_string_is_not_a_list_of_prompts(sess):
    with pytest.raises(TypeError, match="prompts must be a list of prompts .* got a str"):
        list(sess.generate_batch("text", max_new_tokens=1))


def test_a_prompt_that_is_not_utf8_names_the_prompt(sess, tiny_export):
    with pytest.raises(ValueError, match=r"prompt is not valid UTF-8 text \(byte ff at character 1\)"):
        list(sess.generate("a\udcff", max_new_tokens=1))
    r = CliRunner().invoke(main, ["generate", str(tiny_export), "--prompt", "a\udcffb"])
    assert r.exit_code == 2 and "error: --prompt is not valid UTF-8 text (byte ff at character 1)" in r.stderr


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError "... (os error 28)": `init` (and `train`, the
    same save_checkpoint) say it is the disk, name the file and the fix, and leave nothing behind."""
    from safetensors import SafetensorError

    import ressformer.checkpoint as ck

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_file", full)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["init", "ck"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "model.safetensors: No space left on device; free some space or write elsewhere" in r.stderr
    assert "Safetensor" not in r.stderr and list(tmp_path.iterdir()) == []


# ---- 7. one message style: the same bad inputs to the Python and the Node CLI --------------------------
def _exports(tiny_export, root: Path) -> dict:
    meta = json.loads((tiny_export / "ressformer.json").read_text())
    d = {"ex": tiny_export, "missing": root / "nope", "file": root / "a file.txt"}
    d["file"].write_text("not a folder")
    d["empty"] = root / "empty folder"
    d["empty"].mkdir()
    d["gen_null"] = _with_sidecar(tiny_export, root / "gen-null", generation=None)
    d["gen_temp"] = _with_sidecar(tiny_export, root / "gen-temp", generation={"temperature": -1})
    d["gen_key"] = _with_sidecar(tiny_export, root / "gen-key", generation={"top-p": 0.5})
    d["edited"] = _with_sidecar(tiny_export, root / "edited", steps=meta["steps"] + 1)
    d["notjson"] = _copy(tiny_export, root / "notjson")
    (d["notjson"] / "ressformer.json").write_text("{truncated")
    d["list"] = _copy(tiny_export, root / "list")
    (d["list"] / "ressformer.json").write_text("[]")
    d["short"] = _copy(tiny_export, root / "short")
    g = d["short"] / meta["graphs"]["piece_k2"]["file"]
    g.write_bytes(g.read_bytes()[:1000])
    d["nograph"] = _copy(tiny_export, root / "nograph")
    (d["nograph"] / meta["graphs"]["piece_k2"]["file"]).unlink()
    return d


# (id, export, extra args, exit code, what both lines contain; None: the lines are equal but for the --help hint)
CROSS = [
    ("top-p-2", "ex", ["--top-p", "2"], 2, None), ("top-p-0", "ex", ["--top-p", "0"], 2, None),
    ("top-k-neg", "ex", ["--top-k", "-1"], 2, None), ("top-k-float", "ex", ["--top-k", "1.5"], 2, None),
    ("temp-neg", "ex", ["--temperature", "-0.5"], 2, None), ("temp-word", "ex", ["--temperature", "hot"], 2, None),
    ("temp-nan", "ex", ["--temperature", "nan"], 2, None), ("max-new-neg", "ex", ["--max-new-tokens", "-1"], 2, None),
    ("penalty-0", "ex", ["--repetition-penalty", "0"], 2, None), ("seed-neg", "ex", ["--seed", "-1"], 2, None),
    ("stop-empty", "ex", ["--stop", ""], 2, None), ("steps-0", "ex", ["--steps", "0"], 2, None),
    ("threads-0", "ex", ["--threads", "0"], 2, None), ("unknown-option", "ex", ["--frobnicate"], 2, None),
    ("extra-arg", "ex", ["more"], 2, None), ("no-export", None, [], 2, None),
    ("missing-folder", "missing", [], 2, None), ("file-as-folder", "file", [], 2, None),
    ("not-an-export", "empty", [], 1, "has no ressformer.json: not a ressformer export folder (make one with"),
    ("gen-null", "gen_null", [], 1, "ressformer.json: generation must be a JSON object"),
    ("gen-temp", "gen_temp", [], 1, "ressformer.json: generation.temperature must be a finite number >= 0"),
    ("gen-key", "gen_key", [], 1, "ressformer.json: generation.top-p is not a generation option"),
    ("edited", "edited", [], 1, "was edited: its model fields no longer match model_sha256"),
    ("notjson", "notjson", [], 1, "ressformer.json is corrupted"),
    ("list", "list", [], 1, "is not a ressformer sidecar (a JSON object is expected)"),
    ("short-graph", "short", [], 1, "piece_k2.onnx (piece_k2) is"),
    ("missing-graph", "nograph", [], 1, "piece_k2.onnx (piece_k2) is missing"),
]


@pytest.fixture(scope="module")
def exports(tiny_export, tmp_path_factory):
    return _exports(tiny_export, tmp_path_factory.mktemp("cross"))


@pytest.mark.parametrize("case", CROSS, ids=[c[0] for c in CROSS])
def test_python_and_node_clis_answer_bad_input_alike(exports, case, monkeypatch):
    _, which, extra, code, text = case
    args = ([str(exports[which])] if which else []) + extra
    args += ["--max-new-tokens", "2"] * ("--max-new-tokens" not in extra)
    monkeypatch.delenv("RESSFORMER_DEBUG", raising=False)
    py = CliRunner().invoke(main, ["generate", *args])
    js = subprocess.run([_node(), str(JS / "cli.mjs"), *args], capture_output=True, text=True, timeout=120)
    lines = {"python": py.stderr.strip().splitlines(), "node": js.stderr.strip().splitlines()}
    assert (py.exit_code, js.returncode) == (code, code), lines
    for who, ls in lines.items():
        assert len(ls) == 1 and ls[0].startswith("error: ") and "Traceback" not in ls[0], (who, ls)
        assert "Error:" not in ls[0] and "Error " not in ls[0], (who, ls)  # no exception class names
    assert js.stdout == "" and "error" not in py.stdout
    strip = lambda s: s.split(" (see `")[0]  # noqa: E731
    if text is None:
        assert strip(lines["python"][0]) == strip(lines["node"][0]), lines
    else:
        assert all(text in ls[0] for ls in lines.values()), lines
