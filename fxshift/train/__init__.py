"""Training helpers: DeepShift parameter groups and regulariser."""
from .deepshift import deepshift_param_groups, ps_weight_decay_loss, shift_parameters, shift_regularizer

__all__ = ["deepshift_param_groups", "shift_regularizer", "ps_weight_decay_loss", "shift_parameters"]
