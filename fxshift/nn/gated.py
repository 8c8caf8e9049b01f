"""GatedConv2d: a conv + BatchNorm + activation unit whose filters are chosen per input (FTWT, docs/methods.md §9).

A mask predictor reads the unit's input (global average pool → 1×1 conv) and gives one logit per
output filter. The unit's forward takes ``(x, in_idx)`` and returns ``(y, out_idx)``:

- training mode: the unit computes its targets (fxshift.nn.mask_targets) from its dense output and
  keeps the BCE of its logits against them in ``last_loss`` (read by fxshift.train.mask_loss). ``y``
  is the dense output multiplied, per ``train_mask``, by the predictor's own selection (thresholded,
  no gradient through it: "predicted", the default, as the FTWT authors train, so the network trains
  on what inference runs), by the targets ("target") or by nothing ("none"). With ``decoupled`` the
  predictor reads a detached input, so the mask loss trains the predictors only. ``out_idx`` is None.
- eval, gating "mask" (the reference): the dense output with the unselected channels zeroed;
  ``out_idx`` is None.
- eval, gating "skip" (the default): only the selected filters are computed. ``y`` holds just the
  active channels, listed in ``out_idx``; the weight rows (and BN scale/shift) of those
  filters are gathered, and when the input is itself compact (``in_idx`` not None) so are the weight
  columns of the active input channels. ``scatter_channels(y, out_idx, C)`` restores the full layout.
  For a batch of B > 1 the unit computes the union of the samples' selections and zeros each
  sample's unselected channels, so outputs equal "mask" mode exactly; the saving then shrinks as the
  selections diverge. Per-sample skipping is batch 1.

Selection (fxshift.ops.gated_ops.select_filters): with target "mass" a filter is selected when
sigmoid(logit) > 0.5 (logit > 0), and when a sample selects none its highest-logit filter is kept, so
no unit ever computes an empty output; with target "uniform" exactly the round(ratio·C) filters with
the highest logits are, in training, eval, skip mode and the ONNX export alike.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..costs import register_mac_rule
from ..ops.gated_ops import gated_conv2d, scatter_channels_op, select_filters, skip_conv
from .mask_targets import check_target, mask_targets, uniform_count

GATINGS = ("skip", "mask")
#: what multiplies a unit's output in training: the predictor's own selection, the targets, or nothing.
TRAIN_MASKS = ("predicted", "target", "none")


def check_train_mask(train_mask: Any, where: str = "GatedConv2d") -> str:
    """The train_mask setting as one of TRAIN_MASKS; a bool (recipes saved before it had three values)
    maps True → "target", False → "none"."""
    if isinstance(train_mask, bool):
        return "target" if train_mask else "none"
    if train_mask not in TRAIN_MASKS:
        raise ConfigError(f"{where}: train_mask must be 'predicted' (train under the predictor's own masks, as "
                          f"inference runs), 'target' or 'none', got {train_mask!r}")
    return train_mask

#: activation name (as saved in the recipe) -> module factory.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU,
}


def activation_name(act: Optional[nn.Module]) -> str:
    if act is None:
        return "none"
    for name, factory in ACTIVATIONS.items():
        if type(act) is factory and (name != "gelu" or act.approximate == "none"):
            return name
    raise ConfigError(f"GatedConv2d: activation {act!r} is not supported; use one of {', '.join(ACTIVATIONS)} "
                      "or leave it outside the unit")


def scatter_channels(y: torch.Tensor, idx: Optional[torch.Tensor], channels: int) -> torch.Tensor:
    """The full channel layout of a compact tensor: channel idx[i] of the result is y[:, i], the rest zero."""
    if idx is None:
        return y
    shape = (y.shape[0], channels) + tuple(y.shape[2:])
    if torch.compiler.is_compiling():  # torch.onnx.export (dynamo): one op with a static output shape
        return scatter_channels_op(y, idx, channels)
    return y.new_zeros(shape).index_copy(1, idx, y)


def plain_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A plain nn.BatchNorm2d copy of `bn` (a subclass such as timm's BatchNormAct2d also applies its
    activation in forward; the unit applies the activation itself)."""
    if type(bn) is nn.BatchNorm2d:
        return copy.deepcopy(bn)
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                           device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    own = {k: v for k, v in bn.state_dict().items() if "." not in k}
    plain.load_state_dict(own)
    plain.train(bn.training)
    return plain


def _exporting() -> bool:
    return torch.compiler.is_compiling()   # also true under torch.onnx.export (dynamo); cheap to ask


class GatedConv2d(nn.Module):
    """One dynamically pruned unit: ``conv`` → ``bn`` (optional) → ``act`` (optional), with a mask predictor.

    Args:
        conv: an ungrouped Conv2d with zero padding (copied).
        bn: the BatchNorm2d that follows it, or None (copied).
        act: the activation after the BatchNorm, or None (copied).
        target, threshold, ratio: the training targets (fxshift.nn.mask_targets).
        decoupled: the predictor reads a detached input in training.
        gating: "skip" or "mask" (eval behaviour; fxshift.nn.set_gating switches it).
        channel_multiple: target "uniform" keeps a multiple of this many filters (on 4·multiple or
            more channels; fxshift.nn.mask_targets.uniform_count), 1 for round(ratio·C) exactly.
        train_mask: what multiplies the output in training: "predicted" (the predictor's own binary
            selection, the default), "target" (the targets) or "none" (dense); True / False mean
            "target" / "none".
    """

    method = "gated_conv2d"

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, act: Optional[nn.Module] = None, *,
                 target: str = "mass", threshold: Optional[float] = None, ratio: Optional[float] = None,
                 decoupled: bool = True, gating: str = "skip", train_mask: Any = "predicted",
                 channel_multiple: int = 1):
        super().__init__()
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros" or \
                isinstance(conv.padding, str):
            raise ConfigError(f"GatedConv2d needs an ungrouped nn.Conv2d with numeric zero padding, got {conv!r}")
        if bn is not None and (not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats
                               or bn.num_features != conv.out_channels):
            raise ConfigError(f"GatedConv2d: {bn!r} must be a BatchNorm2d over the conv's {conv.out_channels} "
                              "channels with running statistics")
        self.target, self.threshold, self.ratio = check_target(target, threshold, ratio, "GatedConv2d")
        #: exact filter count selected per sample (target "uniform"); 0: the logit > 0 threshold
        if not isinstance(channel_multiple, int) or channel_multiple < 1:
            raise ConfigError(f"GatedConv2d: channel_multiple must be a positive int, got {channel_multiple!r}")
        self.channel_multiple = channel_multiple
        self.top_k = uniform_count(conv.out_channels, self.ratio, channel_multiple) if self.target == "uniform" else 0
        self.act_name = activation_name(act)
        self.conv = copy.deepcopy(conv)
        self.bn = plain_batchnorm(bn) if bn is not None else None
        self.act = ACTIVATIONS[self.act_name]() if act is not None else None
        param = conv.weight
        self.predictor = nn.Conv2d(conv.in_channels, conv.out_channels, 1, device=param.device, dtype=param.dtype)
        with torch.no_grad():  # start with every filter on (the unit equals the dense layers); training
            self.predictor.weight.zero_()  # moves each logit by its own targets, so zeros break no symmetry
            self.predictor.bias.fill_(0.1)
        self.decoupled = bool(decoupled)
        self.train_mask = check_train_mask(train_mask)
        self.gating = gating
        set_unit_gating(self, gating)
        self.last_loss: Optional[torch.Tensor] = None
        self.recording = False          # dynamic_macs turns this on to read last_keep / last_shapes
        self.last_keep: Optional[torch.Tensor] = None
        self.last_shapes: Optional[tuple] = None
        self.source: Optional[str] = None   # the gated unit whose compact output this one reads
        self.bn_layer: Optional[str] = None  # where the BatchNorm was in the original model (for the recipe)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def extra_repr(self) -> str:
        setting = f"threshold={self.threshold}" if self.target == "mass" else f"ratio={self.ratio} (k={self.top_k})"
        return (f"target={self.target}, {setting}, gating={self.gating}, decoupled={self.decoupled}, "
                f"train_mask={self.train_mask}")

    # --- pieces -------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor, in_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C_out) predictor logits for the (possibly compact) input x."""
        pooled = x.mean(dim=(2, 3))
        weight = self.predictor.weight.flatten(1)
        if in_idx is not None:
            weight = weight.index_select(1, in_idx)
        return F.linear(pooled, weight, self.predictor.bias)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Boolean (B, C_out) selection of this unit's filters from its logits (top-k or threshold)."""
        return select_filters(logits, self.top_k)

    def affine(self) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Eval-mode per-filter (scale, shift) of conv bias + BatchNorm: y = conv_nobias(x)·scale + shift;
        scale is None for a unit without BatchNorm."""
        conv, bn = self._modules["conv"], self._modules.get("bn")
        weight, bias = conv.weight, conv.bias
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        if bn is None:
            return None, bias
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = (bias - bn.running_mean) * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale, shift

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv._conv_forward(x, self.conv.weight, self.conv.bias)
        if self.bn is not None:
            y = self.bn(y)
        return self.act(y) if self.act is not None else y

    def _record(self, keep: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.recording:
            self.last_keep = keep.detach()
            self.last_shapes = (tuple(x.shape[2:]), tuple(y.shape[2:]))

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, in_idx: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if in_idx is not None and self.training:
            raise ConfigError("GatedConv2d got a compact input in training mode; call .train() on the whole model")
        if self.training:
            return self._train_forward(x), None
        if self.last_loss is not None and not _exporting():   # (nn.Module.__setattr__ is slow: only when set)
            self.last_loss = None
        if self.gating == "mask":
            if in_idx is not None:
                x = scatter_channels(x, in_idx, self.in_channels)
            keep = self.select(self.logits(x))
            y = self._dense(x) * keep[:, :, None, None].to(x.dtype)
            self._record(keep, x, y)
            return y, None
        if torch.compiler.is_compiling():
            return gated_conv2d(self, x, in_idx)
        return self._skip(x, in_idx)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x.detach() if self.decoupled else x)
        y = self._dense(x)
        targets = mask_targets(y, self.target, self.threshold, self.ratio, self.top_k)
        self.last_loss = F.binary_cross_entropy_with_logits(logits, targets)
        if self.train_mask == "predicted":
            y = y * self.select(logits.detach())[:, :, None, None].to(y.dtype)
        elif self.train_mask == "target":
            y = y * targets[:, :, None, None]
        return y

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight × BN scale, shift): the eval-mode conv as one weight and bias."""
        scale, shift = self.affine()
        return (self.conv.weight if scale is None else self.conv.weight * scale.view(-1, 1, 1, 1)), shift

    def _skip(self, x: torch.Tensor, in_idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # Nothing derived from the parameters is cached: an update through ``p.data`` changes no version
        # counter, so any cache could go stale. The BN scale multiplies only the gathered weight rows.
        modules = self._modules
        conv, predictor = modules["conv"], modules["predictor"]
        scale, shift = self.affine()
        y, idx, keep = skip_conv(x, in_idx, conv.weight, scale, shift, predictor.weight.flatten(1), predictor.bias,
                                 conv.stride, conv.padding, conv.dilation, self.act_name, self.top_k)
        if self.recording:
            if keep is None:
                keep = torch.zeros(x.shape[0], self.out_channels, dtype=torch.bool, device=x.device)
                keep[:, idx] = True
            self._record(keep, x, y)
        return y, idx

    # --- costs --------------------------------------------------------------------------------------
    def static_macs(self, out_hw: tuple[int, int]) -> int:
        """Dense MACs per sample: the conv plus the predictor's 1×1 conv (its pooling is not counted here)."""
        kh, kw = self.conv.kernel_size
        return self.out_channels * self.in_channels * (kh * kw * out_hw[0] * out_hw[1] + 1)

    def sample_macs(self, in_active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample MACs of the last recorded forward: the active filters × active input channels of
        the conv, the predictor's pooling (one add per input value) and its 1×1 conv."""
        if self.last_keep is None or self.last_shapes is None:
            raise ConfigError("GatedConv2d.sample_macs needs a recorded eval forward (use fxshift.dynamic_macs)")
        keep = self.last_keep
        n_out = keep.sum(dim=1).to(torch.float64)
        n_in = torch.full_like(n_out, self.in_channels) if in_active is None else in_active.to(torch.float64)
        (hi, wi), (ho, wo) = self.last_shapes
        kh, kw = self.conv.kernel_size
        conv = n_out * n_in * kh * kw * ho * wo
        predictor = n_in * hi * wi + n_in * self.out_channels
        return conv + predictor

    # --- recipe -------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        conv = self.conv
        return {"method": self.method, "target": self.target, "threshold": self.threshold, "ratio": self.ratio,
                "decoupled": self.decoupled, "gating": self.gating, "train_mask": self.train_mask,
                "channel_multiple": self.channel_multiple,
                "act": self.act_name, "bn": self.bn is not None, "in_channels": conv.in_channels,
                "out_channels": conv.out_channels}

    @classmethod
    def from_spec(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], act: Optional[nn.Module],
                  spec: dict[str, Any]) -> "GatedConv2d":
        return cls(conv, bn, act, target=spec["target"], threshold=spec.get("threshold"), ratio=spec.get("ratio"),
                   decoupled=spec.get("decoupled", True), gating=spec.get("gating", "skip"),
                   channel_multiple=spec.get("channel_multiple", 1),
                   train_mask=spec.get("train_mask", False))   # recipes before train_mask existed: dense


def set_unit_gating(unit: GatedConv2d, gating: str) -> None:
    if gating not in GATINGS:
        raise ConfigError(f"gating must be 'skip' (compute only the selected filters) or 'mask' (dense, then zero "
                          f"the unselected channels), got {gating!r}")
    unit.gating = gating


def gated_units(model: nn.Module) -> list[tuple[str, GatedConv2d]]:
    """(name, unit) of every GatedConv2d in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedConv2d)]


def set_gating(model: nn.Module, gating: str) -> nn.Module:
    """Switch every gated unit of `model` to "skip" (compute only selected filters) or "mask" (dense then
    zero); returns the model. Raises ConfigError for another value or a model without gated units."""
    units = gated_units(model)
    if gating not in GATINGS:
        raise ConfigError(f"set_gating: gating must be 'skip' or 'mask', got {gating!r}")
    if not units:
        raise ConfigError("set_gating: the model has no gated units; apply fxshift.DynamicPrunePass first")
    for _, unit in units:
        set_unit_gating(unit, gating)
    return model


@register_mac_rule(GatedConv2d)
def _gated_macs(module: GatedConv2d, output: torch.Tensor) -> int:
    return module.static_macs(tuple(output.shape[2:]))
