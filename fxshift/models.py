"""Small reference models the demo, the experiments and the tests train on Fashion-MNIST."""
from __future__ import annotations

from torch import nn


def small_cnn() -> nn.Module:
    """A compact CNN for 28×28 grey images: four conv blocks and a linear classifier."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
