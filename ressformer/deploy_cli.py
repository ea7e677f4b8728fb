"""CLI commands for export, parity, generation, scoring, benchmarks and the end-to-end demo.

`generate` and `score` need only numpy + onnxruntime (they import `ressformer.runtime` alone).
Options are checked by the parameter types of `ressformer.cli` before any work starts; errors
reach the user as one line through `ressformer.cli.Group.main`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .cli import (
    PRESET,
    PROVIDER,
    Choice,
    Float,
    Int,
    IntList,
    OptionError,
    check_output_file,
    is_quiet,
    needs_torch,
    say,
    set_threads,
    threads_option,
    write_json,
)

SIDECAR_KEYS = ("config", "graphs", "steps", "tokenizer", "checkpoint_sha256")


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="export folder to create")
@click.option("--opset", default=20, show_default=True, type=Int(18, 23), help="default-domain ONNX opset (18-23)")
@click.option("--dtype", default="fp32", show_default=True, type=Choice(["fp32", "fp16"], "unsupported dtype"),
              help="fp16: weights stored as float16 (computation stays float32)")
@click.option("--quantize", default=None, type=Choice(["int8"], "unsupported quantization"),
              help="int8: dynamic quantization of the weight MatMuls")
@click.option("--steps", default=None, type=IntList(1),
              help="K of the unrolled graphs, or a list K1,K2 (default: the trained K)")
@click.option("--no-validate", is_flag=True, help="skip the ONNX Runtime vs PyTorch validation")
@click.option("--overwrite", is_flag=True, help="replace a non-empty output folder (atomically; never the checkpoint)")
@threads_option
@needs_torch
def export(checkpoint, out, opset, dtype, quantize, steps, no_validate, overwrite, threads):
    """Export CHECKPOINT to ONNX (graphs + ressformer.json), validated against PyTorch."""
    from .fsutil import same_or_nested

    if same_or_nested(out, checkpoint):
        raise OptionError(f"--out {out} overlaps the checkpoint {checkpoint} (same folder, or one inside the "
                          "other); export to a folder outside the checkpoint")
    set_threads(threads)
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import validate_export

    export_checkpoint(checkpoint, out, opset=opset, dtype=dtype, quantize=quantize,
                      steps=None if steps is None else steps[0] if len(steps) == 1 else steps,
                      validate=None if no_validate else validate_export, overwrite=overwrite, progress=say)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
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
        click.option("--max-new-tokens", type=Int(0), default=None,
                     help="tokens to generate [default: the export's, 200]"),
        click.option("--temperature", type=Float(0), default=None,
                     help="sampling temperature; 0 = greedy [default: the export's, 0.8]"),
        click.option("--top-k", type=Int(0), default=None,
                     help="sample among the k most likely tokens; 0 = all [default: the export's, 0]"),
        click.option("--top-p", type=Float(0, 1, lo_open=True), default=None,
                     help="nucleus sampling mass in (0, 1] [default: the export's, 0.95]"),
        click.option("--repetition-penalty", type=Float(0, lo_open=True), default=None,
                     help="> 1 discourages tokens already present [default: the export's, 1.0]"),
        click.option("--seed", default=None, type=int, help="sampling seed (default: random)"),
        click.option("--stop", multiple=True, callback=_nonempty, help="stop after this text (repeatable)"),
    ]):
        f = opt(f)
    return f


def _nonempty(ctx, param, value):
    if any(s == "" for s in value):
        raise OptionError("--stop takes a non-empty text")
    return value


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default="", help="text to continue (default: a newline)")
@_generation_options
@click.option("--steps", default=None, type=Int(1), help="recurrent steps K at inference (default: trained)")
@click.option("--provider", default="cpu", show_default=True, type=PROVIDER, help="ONNX Runtime execution provider")
@threads_option
def generate(export_dir, prompt, steps, provider, threads, **gen):
    """Continue PROMPT with an exported model; prints text as it is produced."""
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    kw = {k: v for k, v in gen.items() if v is not None and k != "stop"}
    if gen["stop"]:
        kw["stop"] = list(gen["stop"])
    if steps is not None:
        kw["steps"] = steps
    prompt = prompt or "\n"
    pieces = sess.generate_text(prompt, **kw)
    first = next(pieces, "")  # options are checked before anything is printed
    click.echo(prompt + first, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", default=None, type=Int(1), help="recurrent steps K at inference (default: trained)")
@click.option("--provider", default="cpu", show_default=True, type=PROVIDER, help="ONNX Runtime execution provider")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def score(export_dir, files, steps, provider, threads, as_json):
    """Bits per byte (and perplexity) of FILES under an exported model, streamed."""
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    results = {}
    for f in files:
        p = Path(f)
        size = p.stat().st_size
        if size == 0:
            raise click.ClickException(f"{f} is empty: nothing to score")
        with open(p, "rb") as fh, click.progressbar(length=size, label=p.name, file=sys.stderr,
                                                    hidden=is_quiet()) as bar:
            chunks = iter(lambda: fh.read(1 << 16), b"")
            t0 = time.perf_counter()
            try:
                r = sess.score_stream(chunks, steps=steps, progress=bar.update)
            except ValueError as e:
                raise click.ClickException(f"{f}: {e}") from e
            r["seconds"] = time.perf_counter() - t0
        results[f] = r
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for f, r in results.items():
            click.echo(f"{f}: {r['bits_per_byte']:.4f} bits/byte, perplexity {r['perplexity']:.3f} "
                       f"({r['bytes']:,} bytes, {r['bytes'] / max(r['seconds'], 1e-9):,.0f} bytes/s)")


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--preset", default=None, type=PRESET, help="benchmark a random-init preset instead of a checkpoint")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the report here")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), help="write a PNG of the timings here")
@click.option("--overwrite", is_flag=True, help="replace existing --json / --plot files")
@click.option("--smoke", is_flag=True, help="tiny sizes, a few seconds (CI)")
@threads_option
@needs_torch
def bench(checkpoint, preset, json_out, plot_out, overwrite, smoke, threads):
    """PyTorch eager vs ONNX Runtime on the same checkpoint and inputs (see bench/)."""
    if not checkpoint and not preset:
        raise click.UsageError("give a CHECKPOINT or --preset NAME")
    if checkpoint and preset:
        raise click.UsageError("give a CHECKPOINT or --preset NAME, not both")
    check_output_file(json_out, overwrite, inputs=(checkpoint,))
    check_output_file(plot_out, overwrite, inputs=(checkpoint,), what="--plot")
    if checkpoint:
        from ressformer.checkpoint import load_checkpoint

        load_checkpoint(checkpoint)  # a missing or corrupted checkpoint fails here, in one line
    from ressformer.bench.run import run_bench

    rep = run_bench(checkpoint=checkpoint, preset=preset, smoke=smoke, threads=threads, progress=say)
    click.echo(rep["table"])
    if json_out:
        write_json(json_out, rep)
    if plot_out:
        from ressformer.bench.run import plot

        plot(rep, plot_out)


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="folder for the run, the export and the parity report")
@click.option("--steps", default=300, show_default=True, type=Int(1), help="training steps")
@click.option("--preset", default="tiny", show_default=True, type=PRESET, help="model size")
@click.option("--overwrite", is_flag=True, help="replace an earlier demo in --out")
@threads_option
@needs_torch
def demo(out, steps, preset, overwrite, threads):
    """The main job end to end: train a small model on the default corpus, export it, check
    parity, and generate text."""
    from .fsutil import is_nonempty_dir

    out = Path(out)
    if is_nonempty_dir(out) and not overwrite:
        raise OptionError(f"--out {out} already holds files (an earlier demo?); pass --overwrite to replace "
                          "them or choose another --out")
    set_threads(threads)
    import torch

    from ressformer import load_checkpoint
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import run_ladder, validate_export
    from ressformer.train import TrainConfig
    from ressformer.train import train as run_train

    src, ex = out / "train" / "ckpt", out / "export"
    say(f"== 1/4 train {preset} for {steps} steps on the default corpus -> {src}")
    run_train(TrainConfig(preset=preset, steps=steps, out=str(out / "train"), eval_every=max(steps // 3, 1),
                          ckpt_every=0, warmup=min(100, steps // 5), log_every=max(steps // 10, 1),
                          threads=threads, overwrite=overwrite), log=say)
    say(f"== 2/4 export {src} -> {ex}")
    export_checkpoint(src, ex, overwrite=overwrite, validate=validate_export, progress=say)
    say("== 3/4 parity ladder")
    with torch.no_grad():
        rep = run_ladder(load_checkpoint(src).requires_grad_(False), ex, batches=(1, 3), generate_tokens=128,
                         progress=say)
    click.echo(rep["summary"])
    write_json(out / "parity.json", rep)
    if not rep["passed"]:
        raise click.ClickException(f"parity FAILED; the report is {out / 'parity.json'}")
    say("== 4/4 generate (ONNX Runtime)")
    from ressformer.runtime import ReSSFormerSession

    sess = ReSSFormerSession(ex, threads=threads)
    prompt = "ROMEO:\n"
    click.echo(prompt, nl=False)
    for piece in sess.generate_text(prompt, max_new_tokens=300, temperature=0.8, top_p=0.95, seed=0):
        click.echo(piece, nl=False)
    click.echo(f"\n\ndone: checkpoint {src}, export {ex}, parity report {out / 'parity.json'}")


def _check_sidecar(export_dir) -> dict:
    """The export folder's ressformer.json, checked for shape here so that a damaged one is one
    clear line (the session checks hashes and versions)."""
    path = Path(export_dir) / "ressformer.json"
    if not path.is_file():
        raise click.ClickException(f"{export_dir} has no ressformer.json: not an export folder "
                                   "(make one with `ressformer export CHECKPOINT --out FOLDER`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.ClickException(f"{path} is corrupted ({e}); re-export the checkpoint") from e
    if not isinstance(meta, dict):
        raise click.ClickException(f"{path} is not a ressformer sidecar (a JSON object is expected); "
                                   "re-export the checkpoint")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise click.ClickException(f"{path} lacks {', '.join(missing)}; re-export the checkpoint")
    if not isinstance(meta["config"], dict) or not isinstance(meta["graphs"], dict):
        raise click.ClickException(f"{path}: 'config' and 'graphs' must be JSON objects; re-export the checkpoint")
    return meta


def _session(export_dir, **kw):
    from ressformer.runtime import ReSSFormerSession

    _check_sidecar(export_dir)
    try:
        return ReSSFormerSession(export_dir, **kw)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # ModelError is a ValueError
        detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise click.ClickException(f"cannot load the export {export_dir}: {detail}") from e
