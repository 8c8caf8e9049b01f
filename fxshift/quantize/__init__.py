"""Post-training quantisation math (no module swapping; passes drive it)."""
from .shift_calibration import (CalibrationResult, LayerStats, StatsAccumulator, adaround_plan, calibrate_shift_weight,
                                conv_columns, linear_columns, output_error)

__all__ = ["CalibrationResult", "LayerStats", "StatsAccumulator", "adaround_plan", "calibrate_shift_weight",
           "conv_columns", "linear_columns", "output_error"]
