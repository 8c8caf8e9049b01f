import os
import textwrap

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


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module:factory model in the current directory (what users pass as MODEL)."""
    (tmp_path / "tinynet.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        not_a_model = 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def conv_bn_cnn(groups: int = 1) -> torch.nn.Module:
    """conv-BN-ReLU, conv (`groups`), pool, linear, with non-trivial BatchNorm statistics (eval mode)."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1, groups=groups), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, 10))
    bn = m[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    return m.eval()
