"""Multi-modality image fusion: data preparation, training of the registered model
families, inference and metrics.

The package is a plain library: importing it starts no Ray, Prefect or MLflow
machinery; orchestration lives in ``flows/`` and the stage CLIs.
"""

__version__ = "0.1.0"
