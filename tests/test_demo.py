"""A newcomer's first hour (issue 15): the export's model card, generation as applications use it
(a batch of prompts, the repetition penalty, a chat that keeps the recurrent state), and the demo's
story (its per-rung table, verdicts, the files it lists). Built on the session fixtures
`tiny_checkpoint` / `tiny_export`; the full demo run is marked slow."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ressformer import deploy_cli
from ressformer.cli import main


@pytest.fixture(scope="module")
def sess(tiny_export):
    from ressformer.runtime import ReSSFormerSession

    return ReSSFormerSession(tiny_export, threads=1)


def run(args, **kw):
    r = CliRunner().invoke(main, [str(a) for a in args], **kw)
    assert r.exit_code == 0, r.output
    return r.output


# ---- the model card --------------------------------------------------------------------------------
def test_every_export_has_a_model_card(tiny_export, tiny_checkpoint):
    from ressformer import load_checkpoint

    card = (tiny_export / "README.md").read_text(encoding="utf-8")
    meta = json.loads((tiny_export / "ressformer.json").read_text())
    assert meta["checkpoint_sha256"] in card and meta["model_sha256"] in card
    assert f"| parameters | {load_checkpoint(tiny_checkpoint).num_params():,} |" in card
    assert "ONNX Runtime against PyTorch at export: **passed**" in card
    for rung in ("ops", "step", "segment", "stream", "decode", "generate"):
        assert re.search(rf"^\| {rung} \| \d+ \| .* \| passed \|$", card, re.M), rung
    assert f"| segment length L | {meta['segment_len']} tokens |" in card
    assert "| `top_p` | 0.95 |" in card  # the generation defaults
    assert "from ressformer.runtime import ReSSFormerSession" in card and "runtime-contract.md" in card
    assert "README.md" not in json.dumps(meta["graphs"])  # extra: the runtime verifies only the graphs


def test_model_card_code_runs_and_unvalidated_card_says_so(tiny_export, tmp_path):
    from ressformer.export.exporter import write_model_card

    card = (tiny_export / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("EXPORT_DIR", str(tiny_export))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tiny_export / "ressformer.json").read_text())
    text = write_model_card(tmp_path, meta, None).read_text(encoding="utf-8")
    assert "Not validated at export" in text and meta["checkpoint_sha256"] in text


# ---- generate: a batch of prompts, the repetition penalty -------------------------------------------
def test_generate_several_prompts_is_one_batch_call(tiny_export, sess, monkeypatch):
    from ressformer.runtime import ReSSFormerSession

    calls = []
    original = ReSSFormerSession.generate_batch

    def counted(self, prompts, *a, **kw):
        calls.append(list(prompts))
        yield from original(self, prompts, *a, **kw)

    monkeypatch.setattr(ReSSFormerSession, "generate_batch", counted)
    prompts = ["ROMEO:", "JULIET: O Romeo", "A"]
    out = run(["generate", tiny_export, *sum((["--prompt", p] for p in prompts), []), "--max-new-tokens", "12",
               "--temperature", "0", "--repetition-penalty", "1.3", "--threads", "1"])
    assert calls == [prompts]
    texts = re.split(r"^--- \d/3 ---\n", out, flags=re.M)[1:]
    assert len(texts) == 3
    for p, text in zip(prompts, texts):  # each row: what that prompt alone generates
        alone = sess.tokenizer.decode(list(sess.generate(p, max_new_tokens=12, temperature=0, repetition_penalty=1.3)))
        assert text == p + alone + "\n"


def test_generate_repetition_penalty_reaches_the_runtime(tiny_export, sess):
    for rp in ("1.0", "3.0"):
        out = run(["-q", "generate", tiny_export, "--prompt", "abab", "--max-new-tokens", "16", "--seed", "3",
                   "--repetition-penalty", rp])
        want = "".join(sess.generate_text("abab", max_new_tokens=16, seed=3, repetition_penalty=float(rp)))
        assert out == "abab" + want + "\n"


# ---- chat -------------------------------------------------------------------------------------------
def test_chat_three_turns(tiny_export):
    for args in (["generate", tiny_export, "--interactive"], None):
        opts = ["--temperature", "0", "--max-new-tokens", "20", "--threads", "1"]
        inp = "Hello\nHow are you?\n\nGood night\n"  # the empty line is skipped
        if args is None:  # the `chat` command itself
            r = CliRunner().invoke(deploy_cli.chat, [str(tiny_export), *opts], input=inp)
            assert r.exit_code == 0, r.output
            out = r.output
        else:
            out = run([*args, *opts], input=inp)
        m = re.search(r"chat ended: 3 turns, (\d+) tokens of conversation held in a [\d.]+ KiB state", out)
        assert m, out
        assert int(m.group(1)) >= len(inp) - 1 + 3  # the three lines fed, at least a token of reply each


def test_interactive_takes_no_prompt(tiny_export):
    r = CliRunner().invoke(main, ["generate", str(tiny_export), "--interactive", "--prompt", "x"], input="a\n")
    assert r.exit_code == 2 and "not both" in r.output and "Traceback" not in r.output


def test_chat_quits_on_slash_quit(tiny_export):
    out = run(["generate", tiny_export, "--interactive", "--max-new-tokens", "5"], input="one\n/quit\ntwo\n")
    assert "chat ended: 1 turns" in out


def test_chat_state_is_the_whole_conversation(sess):
    """The chat's state after three turns equals a fresh forward over the whole transcript: the
    state carries every turn (and the second reply is not what a fresh chat replies)."""
    chat = deploy_cli.Chat(sess, temperature=0, max_new_tokens=24, stop=["\n"])
    transcript, replies, positions = b"", [], []
    for line in ("Hello", "How are you?", "Good night"):
        before = b"" if chat.at_line_start else b"\n"
        replies.append("".join(chat.reply(line)).encode())
        transcript += before + line.encode() + b"\n" + replies[-1]
        positions.append(chat.state.pos)
    assert positions[0] < positions[1] < positions[2] == len(transcript)
    ids = np.frombuffer(transcript, np.uint8).astype(np.int64)[None]
    _, whole = sess.forward(ids)
    nxt = np.array([[65]])
    np.testing.assert_allclose(sess.forward(nxt, chat.state)[0], sess.forward(nxt, whole)[0], atol=1e-4)
    fresh = deploy_cli.Chat(sess, temperature=0, max_new_tokens=24, stop=["\n"])
    assert "".join(fresh.reply("How are you?")).encode() != replies[1] or \
        not np.allclose(sess.forward(nxt, fresh.state)[0], sess.forward(nxt, chat.state)[0])


def test_chat_memory_is_constant(sess):
    """A long conversation (several segments) holds a state bounded by one segment's keys/values."""
    chat = deploy_cli.Chat(sess, temperature=0.8, max_new_tokens=16, seed=0)
    c = sess.config
    S, H, D, L = sess.steps, sess.n_heads, sess.head_dim, sess.segment_len
    bound = 4 * (sess.conv_width * c["d_model"] + sess.mem_slots * c["d_model"] + 2 * H * sess.mem_slots * D
                 + 2 * S * H * (sess.cache_len + L) * D)
    sizes = []
    for i in range(12):
        list(chat.reply(f"line number {i}"))
        sizes.append(chat.state_bytes())
    assert chat.state.pos > 4 * L and max(sizes) <= bound


# ---- the demo's story -----------------------------------------------------------------------------
def test_rung_table_and_verdict(tiny_export):
    rep = json.loads((tiny_export / "validation.json").read_text())
    table = deploy_cli.rung_table(rep)
    rungs = [ln.split()[0] for ln in table.splitlines()[2:-1]]
    assert rungs == ["ops", "step", "segment", "stream", "decode", "generate"]
    assert "tolerance a, r" in table and "2e-05, 1e-04" in table  # segment's fp32 tolerance
    verdict = deploy_cli.parity_verdict(rep)
    assert verdict.startswith("parity passed: worst error ") and "against tolerance" in verdict


def test_demo_options():
    import click

    cmd = deploy_cli.demo
    opts = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    assert opts["preset"].default == "baby" and opts["steps"].default == deploy_cli.DEMO_STEPS
    assert "threads" in opts and "1 for tiny and baby" in opts["threads"].help


class _Stop(Exception):
    pass


@pytest.mark.parametrize("preset, batch, lr", [("baby", 6, 6e-3), ("tiny", 16, 3e-3)])
def test_demo_trains_with_the_recipe(tmp_path, monkeypatch, preset, batch, lr):
    """The demo trains the baby preset with its recipe (docs/training.md: 6 windows of two 64-byte
    segments per step, peak lr 6e-3, one thread); other presets take `ressformer train`'s defaults."""
    import ressformer.train

    seen = []

    def fake_train(tc, log=print):
        seen.append(tc)
        raise _Stop

    monkeypatch.setattr(ressformer.train, "train", fake_train)
    r = CliRunner().invoke(main, ["demo", "--preset", preset, "--out", str(tmp_path / "d")])
    assert len(seen) == 1 and r.exit_code == 1, r.output  # the CLI's one error path caught _Stop
    tc = seen[0]
    assert (tc.preset, tc.batch_size, tc.seq_len, tc.lr, tc.threads) == (preset, batch, None, lr, 1)
    assert tc.steps == deploy_cli.DEMO_STEPS and tc.warmup == 100


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The whole demo on a few steps: a verdict per stage, every file listed, next commands."""
    out = run(["demo", "--steps", "6", "--out", tmp_path / "d"])
    verdicts = [ln for ln in out.splitlines() if ln.startswith(">> ")]
    assert len(verdicts) == 5, verdicts
    assert re.match(r">> trained baby \(833,185 parameters\) to [\d.]+ bits per byte", verdicts[0])
    assert re.match(r">> exported 7 graphs \([\d.]+ MB\), validated", verdicts[1])
    assert verdicts[2].startswith(">> parity passed: worst error ")
    assert re.match(r">> generation at [\d,]+ tokens/s", verdicts[3])
    assert verdicts[4].startswith(">> demo finished in ")
    files = [p for p in (tmp_path / "d").rglob("*") if p.is_file()]
    for p in files:
        assert str(p.relative_to(tmp_path / "d")) in out, p
    for name in ("loss.png", "metrics.jsonl", "validation.json", "parity.json", "README.md", "model.safetensors"):
        assert any(p.name == name for p in files), name
    assert "ressformer generate" in out.split("next:")[1]
