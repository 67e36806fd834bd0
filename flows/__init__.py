"""Prefect flows: the orchestration edge of the pipeline (retraining, search)."""
