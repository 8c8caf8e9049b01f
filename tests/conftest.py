import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def build_torchvision(name: str) -> torch.nn.Module:
    """A random-init torchvision model in eval mode (no weights can be downloaded here)."""
    import torchvision

    torch.manual_seed(0)
    options = {"googlenet": {"init_weights": False, "aux_logits": False}}.get(name, {})
    return getattr(torchvision.models, name)(weights=None, **options).eval()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
