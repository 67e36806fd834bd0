"""Evaluation: the published fusion metrics, scoring fused images, the evaluate stage.

The metric names live here, torch-free, so that params can be checked without importing
the metric code.
"""

EIGHT = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")  # what papers report
EXTRAS = ("AG", "CC", "MSE", "PSNR")
METRICS = EIGHT + EXTRAS
LOWER_IS_BETTER = frozenset({"MSE"})
