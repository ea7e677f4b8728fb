import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.set_num_threads(2)
    return torch


def perturbed_model(preset="tiny", seed=0, scale=0.3, **overrides):
    """A random model whose zero-initialized parts (conv taps, biases) are non-zero, so every
    path matters in a test."""
    import torch

    from ressformer import ReSSFormer, ReSSFormerConfig

    torch.manual_seed(seed)
    m = ReSSFormer(ReSSFormerConfig.preset(preset, **overrides))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 0.05))
    return m.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from ressformer import save_checkpoint

    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(perturbed_model(), path)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import validate_export

    out = tmp_path_factory.mktemp("ex") / "tiny"
    export_checkpoint(tiny_checkpoint, out, validate=validate_export, step_graphs=True, progress=lambda s: None)
    return out


def native_calls(monkeypatch, name: str, use: bool = True) -> list:
    """use: count the calls of the C kernel wrapper ressformer.native.<name> (built here: the test
    fails where it cannot be, rather than silently testing PyTorch twice); else turn the C kernels off."""
    from ressformer import native

    calls = []
    if use:
        assert native.lib() is not None, native.ERROR
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a: calls.append(1) or real(*a))
    else:
        monkeypatch.setattr(native, "ENABLED", False)
    return calls
