"""Planning: how much each pass does. The Budget (budget.py), the rank grammar of the decomposition
passes (rank_setting.py), the exact knapsack allocation of per-layer candidates (allocation.py), the
decomposition planner with its whole-model calibration for timed budgets (planner.py, calibration.py)
and LayerPrune's number of blocks (block_count.py). Timings come from fxshift.measure."""
from .budget import Budget

__all__ = ["Budget"]
