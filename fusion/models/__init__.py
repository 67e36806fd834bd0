"""Model families, one folder each, behind one registry (``fusion.models.registry``).

Importing this package registers every family (their params sections only: the torch code
of a family is imported when a network is built).
"""

from fusion.models import cddfuse, dae_fuse, mfdce_fuse  # noqa: F401  (registration)
from fusion.models.registry import Family, Phase, create_model, get_family, list_families

__all__ = ["Family", "Phase", "create_model", "get_family", "list_families"]
