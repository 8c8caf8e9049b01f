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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    small tensor ops on a small CPU shared with other jobs run faster on one thread than on two
    fighting for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
