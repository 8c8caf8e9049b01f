"""Small reference models the demo, the experiments and the tests train on Fashion-MNIST."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def small_cnn() -> nn.Module:
    """A compact CNN for 28×28 grey images: four conv blocks and a linear classifier."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus the shortcut (identity, or 1×1 conv + BN when the shape
    changes), then ReLU: the residual unit of the experiments' small ResNets."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 28×28 greyscale images: a stride-2 stem (14×14), three stages of BasicBlocks
    at 14×14, 7×7 and 4×4, global average pooling and a Linear classifier."""

    def __init__(self, widths: tuple[int, int, int] = (48, 96, 192), blocks: int = 1, classes: int = 10):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Conv2d(1, w1, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(w1)
        self.layer1 = nn.Sequential(*[BasicBlock(w1, w1, 1) for _ in range(blocks)])
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, 2), *[BasicBlock(w2, w2, 1) for _ in range(blocks - 1)])
        self.layer3 = nn.Sequential(BasicBlock(w2, w3, 2), *[BasicBlock(w3, w3, 1) for _ in range(blocks - 1)])
        self.fc = nn.Linear(w3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
