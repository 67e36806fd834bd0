"""Entry point MLflow runs when it loads a logged DAE-Fuse model ("models from code")."""

from mlflow.models import set_model

from fusion.serving import FusionPyfunc

set_model(FusionPyfunc())
