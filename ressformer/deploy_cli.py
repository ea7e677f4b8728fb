"""CLI commands for export, parity, generation, scoring, benchmarks and the end-to-end demo.

`generate` and `score` need only numpy + onnxruntime (they import `runtime` alone)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="export folder to create")
@click.option("--opset", default=18, show_default=True, type=int, help="default-domain ONNX opset (18-23)")
@click.option("--dtype", default="fp32", show_default=True, help="fp32 | fp16 (fp16-stored weights)")
@click.option("--quantize", default=None, help="int8: dynamic quantization of the weight MatMuls")
@click.option("--steps", default=None, type=int, help="K of the full graph (default: trained K)")
@click.option("--no-validate", is_flag=True, help="skip the ONNX Runtime vs PyTorch validation")
@click.option("--overwrite", is_flag=True, help="replace a non-empty output folder")
def export(checkpoint, out, opset, dtype, quantize, steps, no_validate, overwrite):
    """Export CHECKPOINT to ONNX (graphs + ressformer.json), validated against PyTorch."""
    from ressformer.checkpoint import CheckpointError
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import validate_export

    try:
        export_checkpoint(checkpoint, out, opset=opset, dtype=dtype, quantize=quantize, steps=steps,
                          validate=None if no_validate else validate_export, overwrite=overwrite, progress=click.echo)
    except (CheckpointError, ValueError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("export_dir", type=click.Path(exists=True))
@click.option("--json", "json_out", type=click.Path(), help="write the report here")
@click.option("--lengths", default=None, help="comma-separated lengths (default: 1,k-1,k,k+1,257,2L+3)")
@click.option("--batches", default="1,3", show_default=True)
@click.option("--provider", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--generate-tokens", default=128, show_default=True, type=int)
def parity(checkpoint, export_dir, json_out, lengths, batches, provider, generate_tokens):
    """Run the parity ladder (ONNX Runtime vs PyTorch); exits non-zero on any failure."""
    from ressformer import load_checkpoint
    from ressformer.parity.ladder import run_ladder

    model = load_checkpoint(checkpoint)
    rep = run_ladder(model, export_dir, lengths=_ints(lengths), batches=tuple(_ints(batches)),
                     provider=provider, generate_tokens=generate_tokens, progress=click.echo)
    click.echo(rep["summary"])
    if json_out:
        _write_json(json_out, rep)
    if not rep["passed"]:
        raise click.ClickException(f"parity FAILED (first failing rung: {rep['first_failing_rung']})")
    click.echo("parity passed")


@click.command()
@click.argument("export_dir", type=click.Path())
@click.option("--prompt", default="", help="text to continue")
@click.option("--max-new-tokens", default=200, show_default=True, type=int)
@click.option("--temperature", default=0.8, show_default=True, type=float, help="0 = greedy")
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--steps", default=None, type=int, help="recurrent steps K at inference (default: trained)")
@click.option("--stop", multiple=True, help="stop after this text (repeatable)")
@click.option("--provider", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--threads", default=None, type=int)
def generate(export_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, steps, stop, provider,
             threads):
    """Continue PROMPT with an exported model; prints text as it is produced."""
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    prompt = prompt or "\n"
    click.echo(prompt, nl=False)
    try:
        for piece in sess.generate_text(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed, stop=list(stop), steps=steps):
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo()


@click.command()
@click.argument("export_dir", type=click.Path())
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--steps", default=None, type=int)
@click.option("--provider", default="cpu", show_default=True)
@click.option("--threads", default=None, type=int)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def score(export_dir, files, steps, provider, threads, as_json):
    """Bits per byte (and perplexity) of FILES under an exported model, streamed."""
    sess = _session(export_dir, provider=provider, threads=threads, steps=steps)
    results = {}
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise click.ClickException(f"{f}: no such file")
        size = p.stat().st_size
        with open(p, "rb") as fh, click.progressbar(length=size, label=p.name, file=sys.stderr) as bar:
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
                       f"({r['bytes']:,} bytes, {r['bytes'] / r['seconds']:,.0f} bytes/s)")


@click.command()
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--preset", default=None, help="benchmark a random-init preset instead of a checkpoint")
@click.option("--json", "json_out", type=click.Path())
@click.option("--plot", "plot_out", type=click.Path())
@click.option("--smoke", is_flag=True, help="tiny sizes, a few seconds (CI)")
@click.option("--threads", default=None, type=int)
def bench(checkpoint, preset, json_out, plot_out, smoke, threads):
    """PyTorch eager vs ONNX Runtime on the same checkpoint and inputs (see bench/)."""
    from ressformer.bench.run import run_bench

    if not checkpoint and not preset:
        raise click.UsageError("give a CHECKPOINT or --preset NAME")
    rep = run_bench(checkpoint=checkpoint, preset=preset, smoke=smoke, threads=threads, progress=click.echo)
    click.echo(rep["table"])
    if json_out:
        _write_json(json_out, rep)
    if plot_out:
        from ressformer.bench.run import plot

        plot(rep, plot_out)


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@click.option("--steps", default=300, show_default=True, type=int, help="training steps")
@click.option("--preset", default="tiny", show_default=True)
def demo(out, steps, preset):
    """The main job end to end: train a small model on the default corpus, export it, check
    parity, and generate text."""
    from ressformer import load_checkpoint
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import run_ladder, validate_export
    from ressformer.train import TrainConfig
    from ressformer.train import train as run_train

    out = Path(out)
    src, ex = out / "train" / "ckpt", out / "export"
    click.echo(f"== 1/4 train {preset} for {steps} steps on the default corpus -> {src}")
    run_train(TrainConfig(preset=preset, steps=steps, out=str(out / "train"), eval_every=max(steps // 3, 1),
                          ckpt_every=0, warmup=min(100, steps // 5), log_every=max(steps // 10, 1)),
              log=click.echo)
    click.echo(f"== 2/4 export {src} -> {ex}")
    export_checkpoint(src, ex, overwrite=True, validate=validate_export, progress=click.echo)
    click.echo("== 3/4 parity ladder")
    rep = run_ladder(load_checkpoint(src), ex, batches=(1, 3), generate_tokens=128, progress=click.echo)
    click.echo(rep["summary"])
    _write_json(out / "parity.json", rep)
    if not rep["passed"]:
        raise click.ClickException("parity FAILED")
    click.echo("== 4/4 generate (ONNX Runtime)")
    from ressformer.runtime import ReSSFormerSession

    sess = ReSSFormerSession(ex)
    prompt = "ROMEO:\n"
    click.echo(prompt, nl=False)
    for piece in sess.generate_text(prompt, max_new_tokens=300, temperature=0.8, top_p=0.95, seed=0):
        click.echo(piece, nl=False)
    click.echo(f"\n\ndone: checkpoint {src}, export {ex}, parity report {out / 'parity.json'}")


def _session(export_dir, **kw):
    from ressformer.runtime import ModelError, ReSSFormerSession

    try:
        return ReSSFormerSession(export_dir, **kw)
    except (ModelError, ValueError) as e:
        raise click.ClickException(str(e)) from e


def _ints(s):
    return [int(x) for x in s.split(",")] if s else None


def _write_json(path, obj):
    from .cli import write_json  # lazily: cli imports this module while it loads

    write_json(path, obj)
