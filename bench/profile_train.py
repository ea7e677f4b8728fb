"""Profile training steps of a preset (torch.profiler): the ops that take the time.

    python -m ressformer.bench.profile_train [--preset small] [--batch-size 8] [--device cpu|cuda]
        [--dtype fp32|bf16] [--baseline] [--steps 2] [--rows 30] [--threads 1]

Prints the op table sorted by self time on the device (CUDA) or the CPU, and the wall time per step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ressformer.model import ReSSFormer
from ressformer.train import TrainConfig, make_optimizer, model_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    tc = TrainConfig(preset=a.preset, baseline=a.baseline, seq_len=a.seq_len, batch_size=a.batch_size)
    cfg, seq_len = model_config(tc)
    torch.manual_seed(0)
    model = ReSSFormer(cfg).to(dev).train()
    opt = make_optimizer(model, tc)
    x = torch.randint(0, 256, (a.batch_size, seq_len + 1), device=dev)

    def step():
        if a.dtype == "bf16":
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = model(x[:, :-1], state=model.init_state(a.batch_size, dtype=torch.bfloat16))
        else:
            out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten()) + out.aux["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernel compilation)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / a.steps
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
    print(f"{a.preset}{' baseline' if a.baseline else ''} {a.device} {a.dtype}: {wall:.3f} s per step, "
          f"{a.batch_size * seq_len / wall:,.0f} tokens/s (under the profiler)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
