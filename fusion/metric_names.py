"""The names of the fusion metrics, torch-free: params checks metric weights against them
and evaluation computes them, without either importing the other."""

EIGHT = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")  # what papers report
EXTRAS = ("AG", "CC", "MSE", "PSNR")
METRICS = EIGHT + EXTRAS
LOWER_IS_BETTER = frozenset({"MSE"})
GUARDED = ("SD", "SF", "SCD", "SSIM")  # what a fusion may not give up against the rule it
# improves on: copying one source raises VIF and MI while these fall (the gate loss's guard
# and the search's score charge for each loss)
