"""Short real trainings: DeepShift-Q and -PS fine-tuned from a float model stay within 2 points of it.

Fast: sklearn digits (seconds). Slow: Fashion-MNIST (marked slow). Run as a script to print the
accuracies: `python tests/test_shift_training.py [digits|fashion]`.
"""
from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fxshift
from fxshift import ShiftQuantizePass
from fxshift.data import digits, fashion_mnist
from fxshift.train import deepshift_param_groups, shift_regularizer


def small_cnn(side: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 10))


def train(model: nn.Module, data, epochs: int, optimizer, seed: int, reg_wd: float = 0.0,
          batch_size: int = 64) -> None:
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            if reg_wd:
                loss = loss + shift_regularizer(model, reg_wd)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=1000):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def run(train_set, test_set, side: int, float_epochs: int, shift_epochs: int, seed: int = 0) -> dict:
    """Train a float CNN, then fine-tune DeepShift-Q and -PS copies of it; return test accuracies (%)."""
    torch.manual_seed(seed)
    model = small_cnn(side)
    train(model, train_set, float_epochs, torch.optim.Adam(model.parameters(), lr=3e-3), seed)
    results = {"float": accuracy(model, test_set)}
    example = train_set[0][0][None]
    for mode, lr in (("q", 1e-3), ("ps", 1e-2)):
        torch.manual_seed(seed + 1)
        gm = fxshift.apply(ShiftQuantizePass(mode=mode, weight_bits=5), model, example)
        results[f"{mode}_converted"] = accuracy(gm, test_set)
        optimizer = torch.optim.RAdam(deepshift_param_groups(gm), lr=lr)
        train(gm, train_set, shift_epochs, optimizer, seed + 2, reg_wd=1e-5 if mode == "ps" else 0.0)
        results[mode] = accuracy(gm, test_set)
        results[f"{mode}_model"] = gm
    return results


@pytest.fixture
def few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_digits_q_and_ps_within_two_points(few_threads):
    r = run(digits(train=True), digits(train=False), side=8, float_epochs=15, shift_epochs=6)
    assert r["float"] > 95.0, r
    assert r["q"] >= r["float"] - 2.0, {k: v for k, v in r.items() if not k.endswith("_model")}
    assert r["ps"] >= r["float"] - 2.0, {k: v for k, v in r.items() if not k.endswith("_model")}


@pytest.mark.slow
def test_fashion_mnist_q_and_ps_within_two_points():
    try:
        train_set, test_set = fashion_mnist(train=True, limit=20000), fashion_mnist(train=False)
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    r = run(train_set, test_set, side=28, float_epochs=3, shift_epochs=1)
    summary = {k: v for k, v in r.items() if not k.endswith("_model")}
    assert r["float"] > 85.0, summary
    assert r["q"] >= r["float"] - 2.0, summary
    assert r["ps"] >= r["float"] - 2.0, summary


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "digits"
    start = time.time()
    if which == "digits":
        res = run(digits(train=True), digits(train=False), side=8, float_epochs=15, shift_epochs=6)
    else:
        res = run(fashion_mnist(train=True, limit=20000), fashion_mnist(train=False), side=28, float_epochs=3,
                  shift_epochs=1)
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items() if not k.endswith("_model")},
          f"{time.time() - start:.1f}s")
