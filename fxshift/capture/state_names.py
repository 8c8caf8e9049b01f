"""State dict keys as the user's model has them. Canonicalization gives a packed weight its own
Linear ("attn.in_proj_weight" / "attn.in_proj_bias" become "attn.in_proj.weight" / ".bias"); these
hooks make `gm.state_dict()` write the original keys and `gm.load_state_dict()` accept them, so a
captured (or recomposed) model's weights still load into the original model and back."""
from __future__ import annotations

from typing import Any

import torch.fx as fx

_RENAMED = "fxshift_renamed_state"  # gm.meta: {original key: key in the captured graph}


def keep_original_state_names(gm: fx.GraphModule, renamed: dict[str, str]) -> None:
    """Register the hooks on `gm` for `renamed` ({original key: captured key}); nothing when empty."""
    if not renamed:
        return
    gm.meta[_RENAMED] = dict(renamed)
    gm._register_state_dict_hook(_write_original_names)
    gm._register_load_state_dict_pre_hook(_read_original_names, with_module=True)


def _write_original_names(module: fx.GraphModule, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for original, captured in module.meta.get(_RENAMED, {}).items():
        if prefix + captured in state_dict:  # absent once a pass replaced that layer (a Tucker chain)
            state_dict[prefix + original] = state_dict.pop(prefix + captured)


def _read_original_names(module: fx.GraphModule, state_dict: dict, prefix: str, *_: Any) -> None:
    for original, captured in module.meta.get(_RENAMED, {}).items():
        if prefix + original in state_dict and prefix + captured not in state_dict:
            state_dict[prefix + captured] = state_dict.pop(prefix + original)
