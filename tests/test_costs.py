"""fxshift.macs / parameter counts."""
import pytest
import torch
from torch import nn

import fxshift


def _conv_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.Flatten(-3), nn.Linear(4 * 10 * 10, 5))


def test_macs_counts_a_conv_model_by_hand():
    expected = 8 * 100 * 3 * 9 + 4 * 100 * 8 + 5 * 400
    assert fxshift.macs(_conv_model(), torch.randn(2, 3, 10, 10)) == expected


@pytest.mark.parametrize("batch", [1, 5])
def test_macs_of_an_unbatched_input_equal_one_sample(batch):
    # A (C, H, W) image is one sample: its channel count is no batch size.
    model = _conv_model()
    assert fxshift.macs(model, torch.randn(3, 10, 10)) == fxshift.macs(model, torch.randn(batch, 3, 10, 10))


def test_macs_of_an_unbatched_vector_equal_one_sample():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    assert fxshift.macs(model, torch.randn(6)) == fxshift.macs(model, torch.randn(4, 6)) == 6 * 5 + 5 * 2


def test_input_shapes_fall_back_to_the_real_forward_for_data_dependent_code():
    from fxshift.costs import input_shapes

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if float(x.sum()) > -1e9 else x  # a value read: impossible on meta

    shapes = input_shapes(Branchy(), torch.randn(2, 3, 8, 8))
    assert shapes == {"conv": (2, 3, 8, 8)}
