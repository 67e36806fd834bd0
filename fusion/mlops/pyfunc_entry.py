"""Entry point MLflow runs when it loads a logged fusion model ("models from code")."""

from mlflow.models import set_model

from fusion.mlops.pyfunc import pyfunc_class

set_model(pyfunc_class()())
