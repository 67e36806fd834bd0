"""The code that shapes trained weights, relative to the repository root.

Hashed into every training run's name (a change starts new runs instead of resuming old
ones) and listed as the train stages' code deps in dvc.yaml, which reads this file through
DVC's ``vars`` (DVC parses it, it never runs it): keep it a plain literal.
"""

TRAINING_CODE = {"models": "fusion/models", "family": "fusion/family.py",
                 "engine": "fusion/engine", "shards": "fusion/data/shards.py"}
