"""The `ressformer` command line. Heavy imports (torch, onnx) happen inside commands, so
`ressformer --help` is fast and the runtime commands work on an install without torch."""

from __future__ import annotations

import json
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ressformer")
def main():
    """ReSSFormer: train (PyTorch), export (ONNX), verify parity, and run with ONNX Runtime."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", default="tiny", show_default=True, help="tiny | small | base")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="override a config field, e.g. --set normalizer=sparsemax")
def init(out, preset, seed, overrides):
    """Write a randomly initialized checkpoint to OUT."""
    import torch

    from . import ReSSFormer, ReSSFormerConfig, save_checkpoint

    cfg = ReSSFormerConfig.preset(preset, **parse_overrides(overrides))
    torch.manual_seed(seed)
    model = ReSSFormer(cfg)
    save_checkpoint(model, out, extra={"seed": seed, "preset": preset})
    click.echo(f"wrote {out}: preset {preset}, {model.num_params():,} parameters")


def parse_overrides(items) -> dict:
    """FIELD=VALUE strings -> typed dict (JSON values; bare words stay strings)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def write_json(path, obj) -> None:
    """Write obj as JSON atomically (a temporary file in the same folder, then a rename)."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def _register_optional():
    """Commands that live in their own modules (each imports its heavy deps lazily)."""
    from importlib import import_module

    for mod, names in [("ressformer.train_cli", ["train", "mqar", "evaluate"]),
                       ("ressformer.deploy_cli", ["export", "parity", "generate", "score", "bench",
                                                  "demo"])]:
        try:
            m = import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        for n in names:
            if hasattr(m, n):
                main.add_command(getattr(m, n))


_register_optional()

if __name__ == "__main__":
    sys.exit(main())
