"""The ONNX Runtime session: equality with PyTorch, generation, threads, no-torch, bad input."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ressformer.export.exporter import model_hash
from ressformer.runtime import ModelError, ReSSFormerSession

from ressformer import load_checkpoint
from ressformer.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sess(tiny_export):
    return ReSSFormerSession(tiny_export, threads=1)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def toks(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, T))


def torch_logits(model, x, steps=None):
    with torch.no_grad():
        return model(torch.from_numpy(x), steps=steps).logits.numpy()


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (2, 32), (1, 100)])
def test_whole_equals_torch(sess, model, B, T):
    x = toks(B, T)
    got, st = sess.forward(x)
    np.testing.assert_allclose(got, torch_logits(model, x), atol=2e-4, rtol=1e-3)
    assert st.pos == T


def test_unrolled_graphs_equal_step_graphs(sess):
    x = toks(2, 100, seed=3)
    a, sa = sess.forward(x)
    b, sb = sess.forward(x, path="steps")
    assert (sa.path, sb.path) == ("unrolled", "steps")
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(sa.memory, sb.memory, atol=1e-5)
    np.testing.assert_allclose(sa.cache_k, sb.cache_k, atol=1e-5)
    with pytest.raises(ValueError, match="steps path"):
        sess.forward(x[:, :1], sb, path="unrolled")


class CountingRuns:
    """Counts ONNX Runtime runs per graph of a session."""

    def __init__(self, sess, monkeypatch):
        self.calls = {}
        for name, g in sess.graphs.items():
            real = g.run

            def run(feeds, outputs=None, name=name, real=real):
                self.calls[name] = self.calls.get(name, 0) + 1
                return real(feeds, outputs)

            monkeypatch.setattr(g, "run", run)


def test_one_run_per_decoded_token(sess, monkeypatch):
    """Decoding on the unrolled path is one run per token, plus one per finished segment."""
    _, st = sess.forward(toks(1, 5))
    runs = CountingRuns(sess, monkeypatch)
    n = 3 * sess.segment_len
    for i in range(n):
        _, st = sess.forward(toks(1, 1, seed=i), st)
    assert runs.calls == {"piece_k2": n, "segment_end_k2": 3}


def test_steps_other_than_unrolled_need_step_graphs(sess):
    with pytest.raises(ValueError, match="unrolled graphs for K in"):
        sess.forward(toks(1, 3), steps=3, path="unrolled")
    _, st = sess.forward(toks(1, 3), steps=3)
    assert st.path == "steps"


@pytest.mark.parametrize("bad,err", [({}, TypeError), ([], TypeError), ("state", TypeError)])
def test_bad_state_is_a_clear_error(sess, bad, err):
    with pytest.raises(err, match="RuntimeState"):
        sess.forward(toks(1, 3), bad)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_steps(sess, steps):
    with pytest.raises(ValueError, match="positive integer"):
        sess.forward(toks(1, 3), steps=steps)


def test_edited_sidecar_is_refused(tiny_export, tmp_path):
    d = tmp_path / "ex"
    shutil.copytree(tiny_export, d)
    meta = json.loads((d / "ressformer.json").read_text())
    meta["generation"]["temperature"] = 0.5  # the generation defaults are editable
    (d / "ressformer.json").write_text(json.dumps(meta))
    assert ReSSFormerSession(d).generation["temperature"] == 0.5
    meta["config"]["segment_len"] = 16  # a model field is not
    (d / "ressformer.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="edited"):
        ReSSFormerSession(d)


def test_batch_generation_matches_single_rows(sess):
    prompts = ["Hello", "Hi", "Hey there", "Hallo"]
    kw = dict(max_new_tokens=12, temperature=0)
    rows = np.stack(list(sess.generate_batch(prompts, **kw)), 1)  # (B, N)
    for p, row in zip(prompts, rows):
        assert row.tolist() == list(sess.generate(p, **kw))


def test_repetition_penalty_changes_greedy_output(sess):
    a = list(sess.generate("aaaa", max_new_tokens=16, temperature=0))
    b = list(sess.generate("aaaa", max_new_tokens=16, temperature=0, repetition_penalty=5.0))
    assert a != b
    with pytest.raises(ValueError, match="repetition_penalty"):
        list(sess.generate("a", repetition_penalty=0))


@pytest.mark.parametrize("splits", [[1] * 40, [5, 30, 1, 33]])
def test_pieces_and_decoding_equal_torch(sess, model, splits):
    x = toks(2, sum(splits), seed=1)
    st, outs, i = None, [], 0
    for n in splits:
        o, st = sess.forward(x[:, i:i + n], st)
        outs.append(o)
        i += n
    np.testing.assert_allclose(np.concatenate(outs, 1), torch_logits(model, x), atol=2e-4, rtol=1e-3)


def test_steps_other_than_trained(sess, model):
    x = toks(1, 45, seed=2)
    got, st = sess.forward(x, steps=4)
    assert st.steps == 4
    np.testing.assert_allclose(got, torch_logits(model, x, steps=4), atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="steps"):
        sess.forward(x, st, steps=2)


def test_generation_deterministic_and_streams(sess):
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.9)
    a = list(sess.generate("To be", seed=7, **kw))
    b = list(sess.generate("To be", seed=7, **kw))
    c = list(sess.generate("To be", seed=8, **kw))
    assert a == b and a != c and len(a) == 24
    it = sess.generate("x", seed=0, max_new_tokens=5)
    assert isinstance(next(it), int)  # an iterator: tokens come one at a time
    greedy = list(sess.generate("To be", temperature=0, max_new_tokens=10))
    assert greedy == list(sess.generate("To be", temperature=0, max_new_tokens=10, seed=123))


def test_greedy_matches_torch(sess, model):
    ids = np.frombuffer(b"Hello", np.uint8).astype(np.int64)
    got = list(sess.generate(ids, temperature=0, max_new_tokens=40))
    with torch.no_grad():
        out, ref = model(torch.from_numpy(ids)[None]), []
        for _ in range(40):
            ref.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[ref[-1]]]), out.state)
    assert got == ref


def test_stop_sequence(sess):
    full = bytes(sess.generate("ab", seed=3, max_new_tokens=30))
    ids = list(sess.generate("ab", seed=3, max_new_tokens=30, stop=[full[5:7]]))
    assert bytes(ids).endswith(full[5:7]) and len(ids) <= 7
    assert len(list(sess.generate("ab", seed=3, max_new_tokens=30, stop=["never-there"]))) == 30


def test_threads_share_one_session(sess):
    prompts = [f"prompt {i}" for i in range(8)]
    want = {p: [list(sess.generate(p, seed=s, max_new_tokens=6)) for s in range(20)] for p in prompts}
    got, errors = {}, []

    def work(p):
        try:
            got[p] = [list(sess.generate(p, seed=s, max_new_tokens=6)) for s in range(20)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


def test_score_matches_torch(sess, model, tmp_path):
    text = ("Shall I compare thee to a summer's day?\n" * 5).encode()
    r = sess.score_stream(iter([text[:17], text[17:90], text[90:]]))
    x = np.frombuffer(text, np.uint8).astype(np.int64)[None]
    lg = torch.log_softmax(torch.from_numpy(torch_logits(model, x)).double(), -1)[0]
    nll = -lg[:-1].gather(1, torch.from_numpy(x[0, 1:])[:, None]).sum().item()
    assert r["predicted"] == len(text) - 1
    assert abs(r["bits_per_byte"] - nll / (len(text) - 1) / np.log(2)) < 1e-4


@pytest.mark.parametrize("bad,err,match", [
    (np.array([[1, 256]]), ValueError, "token id 256 out of range"),
    (np.array([[-3, 1]]), ValueError, "token id -3 out of range"),
    (np.array([1, 2]), ValueError, "shape"),
    (np.array([[1.0, 2.0]]), TypeError, "integer"),
    (np.zeros((1, 0), np.int64), ValueError, "empty"),
])
def test_bad_tokens(sess, bad, err, match):
    with pytest.raises(err, match=match):
        sess.forward(bad)


def test_bad_state(sess):
    _, st = sess.forward(toks(2, 3))
    with pytest.raises(ValueError, match="batch"):
        sess.forward(toks(1, 3), st)
    from dataclasses import replace

    with pytest.raises(ValueError, match="another model"):
        sess.forward(toks(2, 3), replace(st, owner="0123456789abcdef"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_model_folders(tiny_export, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ReSSFormerSession(tmp_path / "nothing")
    d = _copy(tiny_export, tmp_path / "a")
    (d / "piece_k2.onnx").unlink()
    with pytest.raises(ModelError, match="piece_k2.onnx .* missing"):
        ReSSFormerSession(d)
    d = _copy(tiny_export, tmp_path / "b")
    data = bytearray((d / "piece_k2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "piece_k2.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupted"):
        ReSSFormerSession(d)
    d = _copy(tiny_export, tmp_path / "a2")  # a step graph is checked when its path first runs
    (d / "step.onnx").unlink()
    sess = ReSSFormerSession(d)
    sess.forward(np.array([[1, 2]]))
    with pytest.raises(ModelError, match="step.onnx .* missing"):
        sess.forward(np.array([[1, 2]]), path="steps")
    d = _copy(tiny_export, tmp_path / "c")
    meta = json.loads((d / "ressformer.json").read_text())
    meta["ressformer_opset"]["version"] = 99
    (d / "ressformer.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="unknown ressformer op-set version 99"):
        ReSSFormerSession(d)
    d = _copy(tiny_export, tmp_path / "d")
    (d / "ressformer.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupted"):
        ReSSFormerSession(d)


def test_unknown_opset_inside_graph(tiny_export, tmp_path):
    """A graph that imports an unknown ressformer version is refused even if the sidecar agrees."""
    import hashlib

    import onnx

    d = _copy(tiny_export, tmp_path / "e")
    m = onnx.load(str(d / "segment_end_k2.onnx"))
    m.opset_import.append(onnx.helper.make_opsetid("ressformer", 7))
    onnx.save(m, str(d / "segment_end_k2.onnx"))
    meta = json.loads((d / "ressformer.json").read_text())
    meta["graphs"]["segment_end_k2"]["sha256"] = hashlib.sha256((d / "segment_end_k2.onnx").read_bytes()).hexdigest()
    meta["model_sha256"] = model_hash(meta)  # re-signed: only the graph's own opset import betrays it
    (d / "ressformer.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="version 7"):
        ReSSFormerSession(d)


def test_runtime_never_imports_torch(tiny_export):
    code = f"""
import sys
BLOCKED = ('torch', 'onnx', 'onnxscript', 'export', 'runtime')
OURS = ('ressformer.model', 'ressformer.export', 'ressformer.parity', 'ressformer.checkpoint')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED or name.startswith(OURS):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from ressformer.runtime import ReSSFormerSession
s = ReSSFormerSession({str(tiny_export)!r})
ids = list(s.generate('hi', max_new_tokens=5, seed=0))
assert len(ids) == 5
bad = [m for m in sys.modules if m.split('.')[0] in BLOCKED or m.startswith(OURS)]
assert not bad, bad
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_cli_generate_and_score(tiny_export, tmp_path):
    r = CliRunner().invoke(main, ["generate", str(tiny_export), "--prompt", "Hi", "--max-new-tokens", "8",
                                  "--seed", "1", "--steps", "3"])
    assert r.exit_code == 0 and r.output.startswith("Hi")
    f = tmp_path / "t.txt"
    f.write_text("hello there, " * 20)
    r = CliRunner().invoke(main, ["score", str(tiny_export), str(f), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res[str(f)]["bytes"] == 260 and res[str(f)]["bits_per_byte"] > 0
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "none")])
    assert r.exit_code != 0 and "does not exist" in r.output


# ---- the state layout of contract v3: per-step buffers, appended in place ---------------------------------
def test_decode_across_segment_ends_equals_torch(sess, model):
    """Batch 2: a prefill whose last piece ends a segment exactly, then token by token over two more
    segment ends; every step's logits and the segment's keys/values equal PyTorch's."""
    L = sess.segment_len
    x = toks(2, L + L // 2 + 2 * L + 3, seed=5)
    ref = torch_logits(model, x)
    with torch.no_grad():
        t_state = model(torch.from_numpy(x[:, :L + 20])).state
    _, st = sess.forward(x[:, :20])
    _, st = sess.forward(x[:, 20:L], st)  # a piece that ends a segment exactly
    assert st.pos == L and st.past_k.shape[3] == 0 and st.cache_valid == sess.cache_len
    _, st = sess.forward(x[:, L:L + 20], st)
    pk, _ = sess.past(st)
    np.testing.assert_allclose(pk, t_state.past_k.numpy(), atol=1e-5)
    out = []
    for i in range(L + 20, x.shape[1]):
        lg, st = sess.forward(x[:, i:i + 1], st)
        out.append(lg)
    np.testing.assert_allclose(np.concatenate(out, 1), ref[:, L + 20:], atol=2e-4, rtol=1e-3)
    assert st.pos == x.shape[1] and st.past_k.shape[3] >= st.pos % L


def test_decode_appends_in_place_and_a_forked_state_gets_a_copy(sess):
    _, s0 = sess.forward(toks(1, 5))
    _, s1 = sess.forward(toks(1, 1, seed=1), s0)
    assert s1.past_k is s0.past_k, "the latest state's buffers take the next token in place"
    a, a1 = sess.forward(toks(1, 3, seed=2), s0)  # s0 again: its rows 5.. are s1's now
    assert a1.past_k is not s0.past_k
    b, _ = sess.forward(toks(1, 3, seed=2), s0)
    np.testing.assert_array_equal(a, b)
    c, _ = sess.forward(toks(1, 2, seed=3), s1)  # s1 is still the tip of the first buffers
    whole, _ = sess.forward(np.concatenate([toks(1, 5), toks(1, 1, seed=1), toks(1, 2, seed=3)], 1))
    np.testing.assert_allclose(c, whole[:, -2:], atol=1e-5)


def test_old_format_version_is_refused_asking_to_reexport(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path / "v2")
    meta = json.loads((d / "ressformer.json").read_text())
    meta["format_version"] = 2
    meta["model_sha256"] = model_hash(meta)
    (d / "ressformer.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"format version 2 is older than this runtime's 3 .*re-export") as e:
        ReSSFormerSession(d)
    assert "\n" not in str(e.value)


def test_first_segment_feeds_no_cache_rows(tiny_export, monkeypatch):
    """Before the first segment ends (cache_valid 0) the piece graph gets caches of 0 rows (its `cache`
    axis): the same logits and, renumbered, the same selected keys as with C masked rows; after it,
    the C rows."""
    sess = ReSSFormerSession(tiny_export, threads=1)
    meta = json.loads((tiny_export / "ressformer.json").read_text())
    piece = meta["unrolled"]["2"]["piece"]
    assert next(i for i in meta["graphs"][piece]["inputs"] if i["name"] == "cache_k_0")["shape"][2] == "cache"
    g = sess.graphs[piece]
    rows, real = [], g.run

    def run(feeds, outputs=None):
        rows.append(feeds["cache_k_0"].shape[2])
        return real(feeds, outputs)

    monkeypatch.setattr(g, "run", run)
    x = toks(2, sess.segment_len + 9)
    runs = {}
    for empty in (True, False):
        monkeypatch.setattr(ReSSFormerSession, "_empty_cache_ok", lambda self, name, e=empty: e)
        rows.clear()
        diag = []
        lo, st = sess.forward(x[:, :20], diagnostics=diag)
        lo2, _ = sess.forward(x[:, 20:], st, diagnostics=diag)
        runs[empty] = (np.concatenate([lo, lo2], 1), diag, list(rows))
    (a, da, ra), (b, db, rb) = runs[True], runs[False]
    assert ra == [0, 0, sess.cache_len] and rb == [sess.cache_len] * 3  # pieces: 20, 12 (segment end), 9
    np.testing.assert_array_equal(a, b)
    for p, q in zip(da, db):  # the selected keys (a masked pick: weight 0, a masked cache row or -1)
        np.testing.assert_array_equal(p["attn_w"], q["attn_w"])
        assert (p["attn_w"] > 0).sum() > p["attn_w"].size // 2
        np.testing.assert_array_equal(*(np.where(d["attn_w"] > 0, d["attn_idx"], -1) for d in (p, q)))


def test_buffers_grow_by_an_eighth():
    """A buffer that must hold more rows grows by an eighth (at least MIN_CAPACITY rows, at least what
    is needed, at most the segment): the empty rows every query scores stay few."""
    from ressformer.runtime.session import MIN_CAPACITY, grown_capacity

    L = 1024
    assert grown_capacity(128, 129, L) == 128 + MIN_CAPACITY  # decoding: 64 rows of slack, not 128
    assert grown_capacity(640, 641, L) == 720  # an eighth
    assert grown_capacity(128, 256, L) == 256  # a 128-token piece: exactly its rows
    assert grown_capacity(1000, 1001, L) == L
    cap = MIN_CAPACITY
    for need in range(MIN_CAPACITY + 1, L + 1):  # decoding a whole segment token by token
        if need > cap:
            cap = grown_capacity(cap, need, L)
        assert cap - need < max(MIN_CAPACITY, need / 8), (need, cap)  # doubling: up to need - 1
    assert cap == L
