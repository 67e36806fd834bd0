"""MLOps edge: MLflow tracking and registry, promotion, the loss-weight search."""
