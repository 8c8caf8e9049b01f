import os

import pytest
import torch

QUICK = os.environ.get("FXSHIFT_BENCH_QUICK", "") not in ("", "0")


def build_torchvision(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


@pytest.fixture(scope="session")
def quick() -> bool:
    return QUICK
