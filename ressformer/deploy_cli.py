"""CLI commands for export, parity, generation, scoring, benchmarks and the end-to-end demo.

`generate` and `score` need only numpy + onnxruntime (they import `ressformer.runtime` alone).
Options are checked by the parameter types of `ressformer.cli` before any work starts; errors
reach the user as one line through `ressformer.cli.Group.main`."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import time
from pathlib import Path

import click
import numpy as np

from .cli import (
    PRESET,
    PROVIDER,
    Choice,
    Folder,
    InputFile,
    Int,
    IntList,
    OptionError,
    _installed,
    _name,
    check_output_file,
    is_quiet,
    needs_torch,
    say,
    set_threads,
    threads_option,
    verbose,
    write_json,
)


class Rule(click.ParamType):
    """A generation option checked by its rule in the runtime's table (`RULES` in runtime/sampling.py):
    the same ranges and words as the Python API, the sidecar check and the JavaScript CLI."""

    def __init__(self, rule: str):
        self.rule = rule
        self.name = "integer" if rule in ("top_k", "max_new_tokens", "seed") else "number"

    def convert(self, value, param, ctx):
        from ressformer.runtime.sampling import rule_error

        try:
            v = int(str(value).strip()) if self.name == "integer" else float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{_name(param)} must be {'an integer' if self.name == 'integer' else 'a number'}, "
                              f"got {value!r}", ctx, param) from None
        msg = rule_error(self.rule, v, _name(param), shown=str(value).strip())
        if msg:
            raise OptionError(msg, ctx, param)
        return v


GENAI_MODULES = ("onnxruntime_genai", "transformers")  # the genai extra (the model builder needs transformers)
GENAI_HINT = "pip install 'ressformer[genai]' (onnxruntime-genai needs onnxruntime >= 1.31)"


class VariantList(click.ParamType):
    """Comma-separated ReSSFormer export variants for `bench --against`: `fp32,int8,int4`."""

    name = "V,V,..."
    # = ressformer.bench.genai.ALL_VARIANTS (that module loads onnxruntime): int4-hybrid = int4, hybrid experts
    choices = ("fp32", "int8", "int4", *(f"{q}-{e}" for q in ("int8", "int4") for e in ("hybrid", "qmoe", "dispatch")))

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        bad = [x for x in items if x not in self.choices]
        if bad or not items:
            raise OptionError(f"--variants: unknown variant {', '.join(map(repr, bad)) or repr(value)}; choose "
                              f"from: {', '.join(self.choices)} (comma-separated)", ctx, param)
        return list(dict.fromkeys(items))


@click.command()
@click.argument("checkpoint", type=Folder())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="export folder to create")
@click.option("--opset", default=20, show_default=True, type=Int(18, 23), help="default-domain ONNX opset (18-23)")
@click.option("--dtype", default="fp32", show_default=True, type=Choice(["fp32", "fp16"], "unsupported dtype"),
              help="fp16: weights stored as float16 (computation stays float32)")
@click.option("--quantize", default=None, type=Choice(["int8", "int4"], "unsupported quantization"),
              help="int8/int4: weight-only quantization of every weight MatMul (ONNX Runtime's MatMulNBits), "
                   "validated on bits per byte against PyTorch fp32")
@click.option("--experts", default="auto", show_default=True,
              type=Choice(["auto", "hybrid", "qmoe", "dispatch"], "unknown expert layer"),
              help="with --quantize: hybrid = a decoded token runs one com.microsoft QMoE node per step, prefill "
                   "pieces and batches per-expert MatMulNBits (one copy of the weights on disk, two in memory); "
                   "qmoe = QMoE always (its CPU cost grows per row); dispatch = per-expert MatMulNBits only (runs "
                   "in onnxruntime-web); auto = qmoe for small expert weights, dispatch from 8 MB of them")
@click.option("--block-size", default="32", show_default=True,
              type=Choice(["16", "32", "64", "128", "256"], "unsupported block size"),
              help="with --quantize: weights per quantization scale")
@click.option("--steps", default=None, type=IntList(1),
              help="K of the unrolled graphs, or a list K1,K2 (default: the trained K)")
@click.option("--step-graphs", is_flag=True,
              help="also write the step graphs (embed, step, head, memory): any K at run time (test-time "
                   "depth), at the cost of a second copy of the weights")
@click.option("--top-k", type=Int(1),
              help="keys per query at test time (default: the trained top_k); the weights are unchanged")
@click.option("--no-validate", is_flag=True, help="skip the ONNX Runtime vs PyTorch validation")
@click.option("--overwrite", is_flag=True, help="replace a non-empty output folder (atomically; never the checkpoint)")
@threads_option
@needs_torch
def export(checkpoint, out, opset, dtype, quantize, experts, block_size, steps, step_graphs, top_k, no_validate,
           overwrite, threads):
    """Export CHECKPOINT to ONNX (graphs + ressformer.json), validated against PyTorch."""
    from .fsutil import same_or_nested

    if same_or_nested(out, checkpoint):
        raise OptionError(f"--out {out} overlaps the checkpoint {checkpoint} (same folder, or one inside the "
                          "other); export to a folder outside the checkpoint")
    set_threads(threads)
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import validate_export

    if block_size != "32" and not quantize:
        raise OptionError("--block-size applies to a quantized export: add --quantize int8 or int4")
    if experts != "auto" and not quantize:
        raise OptionError("--experts applies to a quantized export: add --quantize int8 or int4")
    export_checkpoint(checkpoint, out, opset=opset, dtype=dtype, quantize=quantize, block_size=int(block_size),
                      experts=experts,
                      steps=None if steps is None else steps[0] if len(steps) == 1 else steps,
                      step_graphs=step_graphs, top_k=top_k, validate=None if no_validate else validate_export,
                      overwrite=overwrite, progress=say)


@click.command()
@click.argument("checkpoint", type=Folder())
@click.argument("export_dir", type=Folder())
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
@click.option("--overwrite", is_flag=True, help="replace an existing --json file")
@click.option("--lengths", default=None, type=IntList(1),
              help="comma-separated sequence lengths (default: 1,k-1,k,k+1,257,2L+3)")
@click.option("--batches", default="1,3", show_default=True, type=IntList(1), help="comma-separated batch sizes")
@click.option("--provider", default="cpu", show_default=True, type=PROVIDER, help="ONNX Runtime execution provider")
@click.option("--generate-tokens", default=128, show_default=True, type=Int(0),
              help="greedy tokens compared in the generation rung (0 skips it)")
@threads_option
@needs_torch
def parity(checkpoint, export_dir, json_out, overwrite, lengths, batches, provider, generate_tokens, threads):
    """Run the parity ladder (ONNX Runtime vs PyTorch); exits non-zero on any failure."""
    check_output_file(json_out, overwrite, inputs=(checkpoint, export_dir))
    _check_sidecar(export_dir)
    set_threads(threads)
    import torch

    from ressformer import load_checkpoint
    from ressformer.parity.ladder import run_ladder

    model = load_checkpoint(checkpoint).requires_grad_(False)  # the ladder reads tensors with .numpy()
    with torch.no_grad():
        rep = run_ladder(model, export_dir, lengths=lengths, batches=tuple(batches), provider=provider,
                         generate_tokens=generate_tokens, progress=say, threads=threads)
    click.echo(rep["summary"])
    if json_out:
        write_json(json_out, rep)
    if not rep["passed"]:
        raise click.ClickException(f"parity FAILED (first failing rung: {rep['first_failing_rung']}); the "
                                   "report above shows the case; re-export or report it")
    click.echo("parity passed")


def _generation_options(f):
    for opt in reversed([
        click.option("--max-new-tokens", type=Rule("max_new_tokens"), default=None,
                     help="tokens to generate [default: the export's, 200]"),
        click.option("--temperature", type=Rule("temperature"), default=None,
                     help="sampling temperature; 0 = greedy [default: the export's, 0.8]"),
        click.option("--top-k", type=Rule("top_k"), default=None,
                     help="sample among the k most likely tokens; 0 = all [default: the export's, 0]"),
        click.option("--top-p", type=Rule("top_p"), default=None,
                     help="nucleus sampling mass in (0, 1] [default: the export's, 0.95]"),
        click.option("--repetition-penalty", type=Rule("repetition_penalty"), default=None,
                     help="> 1 discourages tokens already present [default: the export's, 1.0]"),
        click.option("--seed", default=None, type=Rule("seed"), help="sampling seed >= 0 (default: random)"),
        click.option("--stop", multiple=True, callback=_nonempty, help="stop after this text (repeatable)"),
    ]):
        f = opt(f)
    return f


def _nonempty(ctx, param, value):
    if any(s == "" for s in value):
        raise OptionError("--stop takes a non-empty text")
    return _utf8(ctx, param, value)


def _utf8(ctx, param, value):
    """Texts given on the command line must be UTF-8 (an undecodable byte arrives as a lone surrogate)."""
    from ressformer.runtime.tokenizer import ByteTokenizer

    for text in value:
        try:
            ByteTokenizer().encode(text, _name(param))
        except ValueError as e:
            raise OptionError(str(e), ctx, param) from None
    return value


@click.command()
@click.argument("export_dir", type=Folder())
@click.option("--prompt", "prompts", multiple=True, callback=_utf8,
              help="text to continue (default: a newline); repeat it for a batch: one call, each row printed")
@click.option("--interactive", is_flag=True,
              help="chat: reply to each line of stdin until a blank line, keeping the recurrent state between "
                   "turns; /quit or end of input ends")
@_generation_options
@click.option("--steps", default=None, type=Int(1), help="recurrent steps K at inference (default: trained)")
@click.option("--provider", default="cpu", show_default=True, type=PROVIDER, help="ONNX Runtime execution provider")
@threads_option
def generate(export_dir, prompts, interactive, steps, provider, threads, **gen):
    """Continue --prompt with an exported model, printing text as it is produced. Several --prompt
    run as one batch (rows of any lengths); --interactive chats, keeping the state between turns."""
    if interactive and prompts:
        raise OptionError("--interactive reads its turns from stdin; give --prompt or --interactive, not both")
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    kw = _generation_kwargs(gen, steps)
    if interactive:
        return _chat_loop(sess, kw)
    prompts = [p or "\n" for p in prompts] or ["\n"]
    if len(prompts) == 1:
        pieces = sess.generate_text(prompts[0], **kw)
        first = next(pieces, "")  # options are checked before anything is printed
        click.echo(prompts[0] + first, nl=False)
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    rows = [[] for _ in prompts]  # one generate_batch call: each row's new tokens
    t0 = time.perf_counter()
    for step in sess.generate_batch(prompts, **kw):
        for b, tok in enumerate(step.tolist()):
            if tok >= 0:
                rows[b].append(tok)
    verbose(f"{sum(map(len, rows))} tokens in {time.perf_counter() - t0:.2f}s for {len(rows)} prompts")
    for b, (p, toks) in enumerate(zip(prompts, rows), 1):
        say(f"--- {b}/{len(rows)} ---")
        click.echo(p + sess.tokenizer.decode(toks))


def _generation_kwargs(gen: dict, steps) -> dict:
    """The generation options given on the command line (unset ones take the export's defaults)."""
    kw = {k: v for k, v in gen.items() if v is not None and k != "stop"}
    if gen["stop"]:
        kw["stop"] = list(gen["stop"])
    if steps is not None:
        kw["steps"] = steps
    return kw


@click.command()
@click.argument("export_dir", type=Folder())
@_generation_options
@click.option("--steps", default=None, type=Int(1), help="recurrent steps K at inference (default: trained)")
@click.option("--provider", default="cpu", show_default=True, type=PROVIDER, help="ONNX Runtime execution provider")
@threads_option
def chat(export_dir, steps, provider, threads, **gen):
    """Chat with an exported model: each line read from stdin is fed to the model, which replies
    until a blank line (or --stop, or --max-new-tokens). The recurrent state carries over between
    turns, so a long conversation costs constant memory. Ends on end of input or /quit."""
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    _chat_loop(sess, _generation_kwargs(gen, steps))


class Chat:
    """A conversation with an export, on the runtime's public API (`forward` and
    `ressformer.runtime.sampling.sample`). Each turn feeds the user's line (and a newline), then
    samples a reply token by token until a stop sequence (default: a blank line, "\\n\\n") or
    max_new_tokens. The state is kept between turns: what was said stays in the model's memory
    and caches, whose size does not grow with the conversation. A line is fed in pieces keeping
    only the last position's logits, so a turn's memory does not grow with its length either.
    Options left None take the export's generation defaults (checked when the export was loaded)."""

    PIECE = 1 << 14  # bytes of a line fed per forward call

    def __init__(self, sess, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None,
                 stop=None, steps=None, repetition_penalty=None):
        from ressformer.runtime.sampling import check_option

        g = sess.generation
        pick = lambda v, name: g[name] if v is None else v  # noqa: E731
        self.sess, self.steps = sess, steps
        self.max_new_tokens, self.temperature = pick(max_new_tokens, "max_new_tokens"), pick(temperature, "temperature")
        self.top_k, self.top_p = pick(top_k, "top_k"), pick(top_p, "top_p")
        self.penalty = pick(repetition_penalty, "repetition_penalty")
        for name in ("max_new_tokens", "temperature", "top_k", "top_p"):
            check_option(name, getattr(self, name))
        check_option("repetition_penalty", self.penalty)
        check_option("seed", seed)
        stop = list(stop) if stop else [*g.get("stop", []), "\n\n"]
        self.stop = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in stop if s]
        self.rng = np.random.default_rng(seed)
        self.state = None  # RuntimeState after the first turn; state.pos: tokens of the conversation
        self.turns, self.at_line_start = 0, True

    class BadLine(ValueError):
        """The user's line is not UTF-8 text; the conversation is as it was before it."""

    def reply(self, line):
        """Feed `line` as the user's turn; yield the reply's text as characters complete. line: text,
        its UTF-8 bytes, or an iterable of pieces of them (a long line need not be held whole). The
        tokenizer is byte-level: token ids are the line's bytes. A line that is not UTF-8 raises
        Chat.BadLine and leaves the conversation unchanged (states are values: the old one is kept)."""
        from ressformer.runtime.sampling import penalize, sample

        sess, before = self.sess, self.state
        if isinstance(line, str):
            line = sess.tokenizer.encode(line, "the line").astype(np.uint8).tobytes()
        if isinstance(line, bytes):
            line = [line[i:i + self.PIECE] for i in range(0, len(line), self.PIECE)]
        seen = set()
        try:
            for data in self._checked(line):  # (1, n) int64 at a time; logits (1, 1, V)
                ids = np.frombuffer(data, np.uint8).astype(np.int64)[None]
                logits, self.state = sess.forward(ids, self.state, steps=self.steps, logits="last")
                seen |= set(data)
        except Chat.BadLine:
            self.state = before
            raise
        last = logits[0, -1]
        dec, tail, longest = sess.tokenizer.stream_decoder(), b"", max(map(len, self.stop), default=1)
        for _ in range(self.max_new_tokens):
            z = last[None].astype(np.float64)
            if self.penalty != 1.0:  # CTRL-style, as in generate: seen tokens' logits shrink
                z = penalize(z, [seen], self.penalty)
            tok = int(sample(z, self.rng, self.temperature, self.top_k, self.top_p)[0])
            logits, self.state = sess.forward(np.array([[tok]], np.int64), self.state)  # the reply joins the state
            last = logits[0, -1]
            seen.add(tok)
            tail = (tail + bytes([tok]))[-longest:]
            piece = dec(tok)
            if piece:
                yield piece
            if any(tail.endswith(s) for s in self.stop):
                break
        self.turns += 1
        self.at_line_start = tail.endswith(b"\n") or not tail

    def _checked(self, pieces):
        """The turn's bytes: a newline if the reply ended mid-line, the pieces checked as UTF-8 as
        they come, a newline."""
        import codecs

        dec, offset = codecs.getincrementaldecoder("utf-8")(), 0
        if not self.at_line_start:
            yield b"\n"
        for data in pieces:
            try:
                dec.decode(data)
            except UnicodeDecodeError as e:  # e.object: the bytes held back from the last piece, then data
                at = offset - (len(e.object) - len(data)) + e.start + 1
                raise Chat.BadLine(f"not valid UTF-8 text (byte {e.object[e.start]:02x} at byte {at})") from None
            offset += len(data)
            if data:
                yield data
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise Chat.BadLine("not valid UTF-8 text (it ends inside a character)") from None
        yield b"\n"

    def state_bytes(self) -> int:
        """Bytes held by the recurrent state (bounded: it does not grow with the conversation)."""
        s = self.state
        arrays = (s.conv, s.memory, s.mem_k, s.mem_v, s.cache_k, s.cache_v, s.past_k, s.past_v) if s else ()
        return sum(a.nbytes if isinstance(a, np.ndarray) else int(np.prod(a.shape())) * 4  # OrtValue: float32
                   for a in arrays if a is not None)


def _chat_loop(sess, kw: dict) -> None:
    chat_ = Chat(sess, **kw)
    tty = sys.stdin.isatty()
    say("chat: type a line and press Enter; the model replies until a blank line. /quit or end of input "
        "(Ctrl-D) ends. The state carries over between turns (constant memory).")
    stdin, n = sys.stdin.buffer, 0  # bytes: an undecodable line is refused alone, not the whole chat
    while True:
        if tty:
            click.echo("> ", nl=False, err=True)
        head = stdin.readline(Chat.PIECE)  # a line is read in pieces: a long one is never held whole
        n += 1
        if not head or head.strip() == b"/quit":
            break
        if head.endswith(b"\n") and not head.strip():
            continue
        pieces = _line_pieces(stdin, head)
        text = ""
        try:
            for text in chat_.reply(pieces):
                click.echo(text, nl=False)
                sys.stdout.flush()
        except Chat.BadLine as e:
            for _ in pieces:  # the rest of the line
                pass
            click.echo(f"error: line {n} is {e}; it was skipped, the conversation goes on: type it again as UTF-8",
                       err=True)
            continue
        if not text.endswith("\n"):
            click.echo()
    say(f"chat ended: {chat_.turns} turns, {chat_.state.pos if chat_.state else 0} tokens of conversation "
        f"held in a {chat_.state_bytes() / 1024:.1f} KiB state")


def _line_pieces(stdin, head: bytes):
    """The pieces of one line of `stdin` whose first piece is `head`, without its line end."""
    piece = head
    while not piece.endswith(b"\n"):
        more = stdin.readline(Chat.PIECE)
        if not more:
            break
        yield piece
        piece = more
    yield piece.rstrip(b"\r\n")


@click.command()
@click.argument("export_dir", type=Folder())
@click.argument("files", nargs=-1, required=True, type=InputFile())
@click.option("--steps", default=None, type=Int(1), help="recurrent steps K at inference (default: trained)")
@click.option("--provider", default="cpu", show_default=True, type=PROVIDER, help="ONNX Runtime execution provider")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def score(export_dir, files, steps, provider, threads, as_json):
    """Bits per byte (and perplexity) of FILES under an exported model, streamed. A FILE may be `-`
    (standard input), a FIFO or a process substitution."""
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    results = {}
    for f in files:
        name = "standard input" if f == "-" else f
        with click.open_file(f, "rb") as fh:
            try:
                st = os.fstat(fh.fileno())
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0  # a pipe's size is unknown: no bar
            except (OSError, ValueError):  # a stream without a file descriptor
                size = 0
            seen = [0]

            def chunks(fh=fh, seen=seen):
                while data := fh.read(1 << 16):
                    seen[0] += len(data)
                    yield data

            with click.progressbar(length=size, label=Path(name).name, file=sys.stderr,
                                   hidden=is_quiet() or not size) as bar:
                t0 = time.perf_counter()
                try:
                    r = sess.score_stream(chunks(), steps=steps, progress=bar.update)
                except ValueError as e:
                    if seen[0] == 0:
                        raise click.ClickException(f"{name} is empty: nothing to score") from e
                    raise click.ClickException(f"{name}: {e}") from e
                r["seconds"] = time.perf_counter() - t0
        results[f] = r
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for f, r in results.items():
            name = "standard input" if f == "-" else f
            click.echo(f"{name}: {r['bits_per_byte']:.4f} bits/byte, perplexity {r['perplexity']:.3f} "
                       f"({r['bytes']:,} bytes, {r['bytes'] / max(r['seconds'], 1e-9):,.0f} bytes/s)")


@click.command()
@click.argument("checkpoint", required=False, type=Folder())
@click.option("--preset", default=None, type=PRESET, help="benchmark a random-init preset instead of a checkpoint")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), help="write a PNG of the timings here")
@click.option("--overwrite", is_flag=True, help="replace existing --json / --plot files")
@click.option("--smoke", is_flag=True, help="tiny sizes, a few seconds (CI)")
@click.option("--baseline", is_flag=True,
              help="instead: ReSSFormer against a dense GPT of the same parameter count, both in ONNX Runtime, "
                   "prefill and decode at long contexts (docs/dense-comparison.md)")
@click.option("--against", default=None, type=Choice(["genai"], "unknown yardstick"),
              help="instead: ReSSFormer fp32/int8/int4 against onnxruntime-genai's dense Llama of the same parameter "
                   "count (fp32 and int4), each point a fresh process (docs/performance.md; needs the genai extra)")
@click.option("--tradeoff", is_flag=True,
              help="instead: for a CHECKPOINT trained by `ressformer recall`, accuracy against ONNX Runtime decode "
                   "latency for test-time K and top_k, and recall against distance (docs/results.md)")
@click.option("--variants", default=None, type=VariantList(),
              help="with --against: the ReSSFormer exports compared [default: fp32,int8,int4]")
@click.option("--lengths", default=None, type=IntList(1),
              help="with --baseline or --against: context lengths [default: 2048,8192,32768 with --baseline, "
                   "128,2048,8192,32768 with --against]")
@click.option("--block-size", default="32", show_default=True,
              type=Choice(["16", "32", "64", "128", "256"], "unsupported block size"),
              help="with --against: int8/int4 weights per scale, for both engines (32 is each one's default)")
@threads_option
@needs_torch
def bench(checkpoint, preset, json_out, plot_out, overwrite, smoke, baseline, against, tradeoff, variants, lengths,
          block_size, threads):
    """PyTorch eager vs ONNX Runtime on the same checkpoint and inputs (see bench/); with --baseline,
    ReSSFormer vs a same-size dense transformer with a key/value cache, both in ONNX Runtime; with
    --against genai, ReSSFormer's exports vs onnxruntime-genai's same-size dense Llama (fp32, int4)."""
    if not checkpoint and not preset:
        raise click.UsageError("give a CHECKPOINT or --preset NAME")
    if checkpoint and preset:
        raise click.UsageError("give a CHECKPOINT or --preset NAME, not both")
    if sum(map(bool, (baseline, against, tradeoff))) > 1:
        raise click.UsageError("--baseline, --against and --tradeoff are different benchmarks; give one")
    if tradeoff and not checkpoint:
        raise click.UsageError("--tradeoff needs a CHECKPOINT trained by `ressformer recall --out CK`")
    if variants and not against:
        raise click.UsageError("--variants goes with --against genai")
    if against == "genai":
        missing = [m for m in GENAI_MODULES if not _installed(m)]
        if missing:
            raise click.ClickException(f"`ressformer bench --against genai` needs the genai extra (missing "
                                       f"{', '.join(missing)}): {GENAI_HINT}")
    check_output_file(json_out, overwrite, inputs=(checkpoint,))
    check_output_file(plot_out, overwrite, inputs=(checkpoint,), what="--plot")
    if checkpoint:
        from ressformer.checkpoint import load_checkpoint

        load_checkpoint(checkpoint)  # a missing or corrupted checkpoint fails here, in one line
    if lengths and not (baseline or against):
        raise click.UsageError("--lengths goes with --baseline or --against")
    if block_size != "32" and not against:
        raise click.UsageError("--block-size goes with --against genai")
    if tradeoff:
        from ressformer.bench.recall import plot, run_tradeoff

        rep = run_tradeoff(checkpoint, smoke=smoke, threads=threads or 1, progress=say)
    elif against == "genai":
        from ressformer.bench.genai import RESS_VARIANTS, plot, run_comparison

        rep = run_comparison(checkpoint=checkpoint, preset=preset or "small", smoke=smoke, threads=threads or 2,
                             lengths=lengths, variants=variants or RESS_VARIANTS, progress=say,
                             block_size=int(block_size))
    elif baseline:
        from ressformer.bench.dense import plot, run_comparison

        rep = run_comparison(checkpoint=checkpoint, preset=preset or "small", smoke=smoke, threads=threads or 2,
                             lengths=lengths, progress=say)
    else:
        from ressformer.bench.run import plot, run_bench

        rep = run_bench(checkpoint=checkpoint, preset=preset, smoke=smoke, threads=threads, progress=say)
    click.echo(rep["table"])
    if json_out:
        write_json(json_out, rep)
    if plot_out:
        plot(rep, plot_out)


DEMO_STEPS = 1000  # baby, 1 thread: ~2 min of training; the whole demo ~2.5 min on an idle 2-core CPU (README)
# The demo's training recipe per preset (docs/training.md, "The recipe"): 6 windows of two 64-byte segments (768
# bytes per step, as nanoGPT's baby GPT), peak lr 6e-3; other presets take `ressformer train`'s defaults.
DEMO_RECIPE = {"baby": dict(batch_size=6, lr=6e-3)}
ONE_THREAD = ("tiny", "baby")  # on a busy 2-core machine one thread trains these many times faster than two


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="folder for the run, the export and the parity report")
@click.option("--steps", default=DEMO_STEPS, show_default=True, type=Int(1), help="training steps")
@click.option("--preset", default="baby", show_default=True, type=PRESET, help="model size")
@click.option("--overwrite", is_flag=True, help="replace an earlier demo in --out")
@click.option("--threads", type=Int(1), default=None,
              help="CPU threads for PyTorch and ONNX Runtime [default: 1 for tiny and baby, the fastest on a busy "
                   "2-core machine; else the libraries' choice]")
@needs_torch
def demo(out, steps, preset, overwrite, threads):
    """The main job end to end: train a small model on the default corpus, export it to ONNX, check
    parity rung by rung, and generate text with ONNX Runtime (baby: about 2.5 minutes on 2 idle CPU cores)."""
    from .fsutil import is_nonempty_dir

    t_demo = time.perf_counter()
    out = Path(out)
    if is_nonempty_dir(out) and not overwrite:
        raise OptionError(f"--out {out} already holds files (an earlier demo?); pass --overwrite to replace "
                          "them or choose another --out")
    threads = threads or (1 if preset in ONE_THREAD else None)
    set_threads(threads)
    import torch

    from ressformer import load_checkpoint
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import run_ladder, validate_export
    from ressformer.runtime import ReSSFormerSession
    from ressformer.train import TrainConfig
    from ressformer.train import train as run_train

    run, ex, parity_json = out / "train", out / "export", out / "parity.json"
    say(f"ressformer demo: train -> export -> parity -> generate; preset {preset}, {steps} training steps, "
        f"{threads or 'default'} thread(s), outputs in {out}")

    say(f"\n== 1/4 train {preset} for {steps} steps on the default corpus (Shakespeare's plays, as bytes)")
    t0 = time.perf_counter()
    res = run_train(TrainConfig(preset=preset, steps=steps, out=str(run), eval_every=max(steps // 2, 1),
                                ckpt_every=0, warmup=min(100, steps // 5), log_every=max(steps // 8, 1),
                                threads=threads, overwrite=overwrite, **DEMO_RECIPE.get(preset, {})), log=say)
    src = Path(res["checkpoint"])
    _verdict(f"trained {preset} ({res['n_params']:,} parameters) to {res['val']['val_bpb']:.2f} bits per byte "
             f"on held-out text in {_dur(time.perf_counter() - t0)}")

    say(f"\n== 2/4 export to ONNX ({ex}), validated against PyTorch before it is put in place")
    t0 = time.perf_counter()
    export_checkpoint(src, ex, overwrite=overwrite, validate=validate_export, step_graphs=True,  # all paths: the
                      progress=lambda s: say(s) if "\n" not in s else verbose(s))  # whole ladder; table: -v
    meta = json.loads((ex / "ressformer.json").read_text())
    val = json.loads((ex / "validation.json").read_text())
    mb = sum(g["bytes"] for g in meta["graphs"].values()) / 1e6
    _verdict(f"exported {len(meta['graphs'])} graphs ({mb:.1f} MB), validated ({len(val['rows'])} comparisons "
             f"with PyTorch passed) in {_dur(time.perf_counter() - t0)}")

    say("\n== 3/4 parity ladder, ONNX Runtime against PyTorch: ops, step, segment, stream, decode, generate")
    t0 = time.perf_counter()
    with torch.no_grad():
        rep = run_ladder(load_checkpoint(src).requires_grad_(False), ex, batches=(1, 3), generate_tokens=128,
                         progress=say, threads=threads)
    write_json(parity_json, rep)
    verbose(rep["summary"])
    click.echo(rung_table(rep))
    if not rep["passed"]:
        raise click.ClickException(f"parity FAILED at rung {rep['first_failing_rung']}; every comparison is in "
                                   f"{parity_json}")
    _verdict(f"{parity_verdict(rep)} ({_dur(time.perf_counter() - t0)})")

    say("\n== 4/4 generate with ONNX Runtime (the runtime alone: numpy + onnxruntime)")
    sess = ReSSFormerSession(ex, threads=threads)
    prompt, dec, n = "ROMEO:\n", sess.tokenizer.stream_decoder(), 0
    click.echo(prompt, nl=False)
    t0 = time.perf_counter()
    for tok in sess.generate(prompt, max_new_tokens=300, temperature=0.8, top_p=0.95, seed=0):
        click.echo(dec(tok), nl=False)
        n += 1
    dt = time.perf_counter() - t0
    click.echo()
    _verdict(f"generation at {n / dt:,.0f} tokens/s ({n} tokens in {dt:.1f}s; temperature 0.8, top-p 0.95, seed 0)")
    say(f"   A {res['n_params']:,}-parameter model after {steps} steps: the shape of a play (names, stage directions, "
        "line breaks, words), not yet sense. Longer training: docs/training.md.")

    say(f"\nfiles written in {out}:")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        say(f"  {str(path.relative_to(out)):34} {path.stat().st_size:>10,} B  {_describe(path)}")
    q = shlex.quote
    say("\nnext:\n" + "\n".join(f"  {c}" for c in (
        f"ressformer generate {q(str(ex))} --prompt 'JULIET:' --prompt 'KING HENRY:'   # a batch of prompts",
        f"ressformer generate {q(str(ex))} --interactive   # a chat; the state carries over between turns",
        f"ressformer score {q(str(ex))} {q(str(ex / 'README.md'))}   # bits per byte of any text file",
        f"less {q(str(ex / 'README.md'))}   # the model card: config, hashes, validation, how to run it",
        "ressformer train --preset baby --batch-size 6 --lr 6e-3 --steps 4000 --threads 1 --out runs/baby"
        "   # longer training, better text (~10 min)")))
    _verdict(f"demo finished in {_dur(time.perf_counter() - t_demo)}")


def _verdict(line: str) -> None:
    """A stage's one-line result (shown with --quiet too)."""
    click.echo(f">> {line}")


def _dur(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _describe(path: Path) -> str:
    name, parent = path.name, path.parent.name
    known = {"config.json": "model config + checkpoint hashes", "model.safetensors": "the trained weights",
             "train_state.safetensors": "optimizer and RNG state (resume with train --resume)",
             "metrics.jsonl": "loss per step, validation bits per byte", "loss.png": "the loss curves",
             "ressformer.json": "the sidecar: config, graphs, hashes, generation defaults",
             "README.md": "the model card", "validation.json": "the export's validation report",
             "parity.json": "the parity ladder's report, every comparison"}
    if name.endswith(".onnx"):
        return "ONNX graph"
    return known.get(name, "") or ("checkpoint file" if parent == "ckpt" else "")


RUNGS = ("ops", "step", "segment", "stream", "decode", "generate")


def rung_table(rep: dict) -> str:
    """The parity report per rung: comparisons, the worst error next to its tolerance, flips."""
    rows = rep["rows"]
    hdr = f"{'rung':8} {'compared':>8}  {'worst error':>11}  {'tolerance a, r':>14}  {'flips':>5}  {'result':6}  where"
    lines = [hdr, "-" * (len(hdr) + 30)]
    for rung in [r for r in RUNGS if any(x["rung"] == r for x in rows)] + \
            sorted({x["rung"] for x in rows} - set(RUNGS)):
        rs = [x for x in rows if x["rung"] == rung]
        flips, ok = sum(x["flips"] for x in rs), all(x["passed"] for x in rs)
        if rung == "generate":
            n = sum(x["compared"] for x in rs)
            worst, tol, where = "0", "exact", f"{n} greedy tokens {'(a tie accepted)' if flips else 'identical'}"
        else:
            w = max(rs, key=lambda x: x["max_abs"])
            worst, tol = f"{w['max_abs']:.1e}", f"{w['atol']:.0e}, {w['rtol']:.0e}"
            where = f"{w['case']}: {w['output']}"
        result = "passed" if ok else "FAILED"
        lines.append(f"{rung:8} {len(rs):8}  {worst:>11}  {tol:>14}  {flips:5}  {result:6}  {where}")
    lines.append("error: max |ORT - PyTorch|; an output passes iff |ORT - PyTorch| <= a * max|PyTorch| + r * "
                 "|PyTorch| elementwise. flips: near-tie top-k choices made differently (accepted below a margin; "
                 "docs/parity.md)")
    return "\n".join(lines)


def parity_verdict(rep: dict) -> str:
    """One line: passed or failed, the worst error against its tolerance."""
    rows = [x for x in rep["rows"] if x["rung"] != "generate" and x["compared"]]
    w = max(rows, key=lambda x: x["max_abs"] / max(x["atol"], 1e-30))
    gen = [x for x in rep["rows"] if x["rung"] == "generate"]
    return (f"parity {'passed' if rep['passed'] else 'FAILED'}: worst error {w['max_abs']:.1e} ({w['rung']}, "
            f"{w['case']}: {w['output']}) against tolerance {w['atol']:.0e} x max|PyTorch| + {w['rtol']:.0e} x "
            "|PyTorch|, "
            f"{len(rep['rows'])} comparisons on {len({x['rung'] for x in rep['rows']})} rungs"
            + (f", {gen[0]['compared']} greedy tokens identical" if gen and all(x["passed"] for x in gen) else ""))


def _check_sidecar(export_dir) -> dict:
    """The export folder's ressformer.json with every check of the runtime (runtime/sidecar.py): a
    damaged one is one clear line naming the file and field, before any graph is opened."""
    from ressformer.runtime.sidecar import read_sidecar

    return read_sidecar(export_dir)


def _session(export_dir, **kw):
    from ressformer.runtime import ReSSFormerSession

    _check_sidecar(export_dir)
    try:
        return ReSSFormerSession(export_dir, **kw)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # ModelError is a ValueError
        detail = str(e) if isinstance(e, (ValueError, TypeError)) else f"missing or malformed entry {e}"
        raise click.ClickException(f"cannot load the export {export_dir}: {detail}") from e
