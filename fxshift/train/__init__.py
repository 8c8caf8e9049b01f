"""Training helpers: DeepShift parameter groups and regulariser; decompose-mid-training schedules; the
FTWT mask loss, its cooldown and BatchNorm re-estimation under gated units."""
from .deepshift import deepshift_param_groups, ps_weight_decay_loss, shift_parameters, shift_regularizer
from .distributed import apply_synced, broadcast_state, max_state_difference, rewrap
from .bn_recalibration import recalibrate_batchnorm
from .cooldown import mask_loss_weight
from .mask_loss import mask_loss
from .optim import load_optimizer_state_by_name, move_lr_scheduler, optimizer_state_by_name, rebuild_optimizer
from .schedule import DecomposeSchedule

__all__ = ["deepshift_param_groups", "shift_regularizer", "ps_weight_decay_loss", "shift_parameters"]
__all__ += ["DecomposeSchedule", "rebuild_optimizer", "move_lr_scheduler", "optimizer_state_by_name",
            "load_optimizer_state_by_name", "apply_synced", "broadcast_state", "max_state_difference", "rewrap"]
__all__ += ["mask_loss", "mask_loss_weight", "recalibrate_batchnorm"]
