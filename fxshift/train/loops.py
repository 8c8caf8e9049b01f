"""Plain training and evaluation loops shared by the demo and the experiments."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def train_epochs(model: nn.Module, loader: DataLoader, epochs: int, lr: float, desc: str,
                 make_optimizer: Optional[Callable] = None,
                 extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> None:
    """Train with AdamW and a one-cycle schedule over `epochs`, a progress bar per epoch;
    `extra_loss(model)` (e.g. fxshift.train.mask_loss) is added to the cross-entropy after each forward."""
    optimizer = (make_optimizer or (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=1e-4)))(model.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, unit="batch")
        for x, y in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent of `model` (put in eval mode) over `loader`."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total
