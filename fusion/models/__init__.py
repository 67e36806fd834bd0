"""Model families, one folder each, behind one registry (``fusion.family``).

Importing this package registers every family (their params sections only: the torch code
of a family is imported when a network is built).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fusion.family import Family, Phase, get_family, list_families
from fusion.models import cddfuse, dae_fuse, mfdce_fuse  # noqa: F401  (registration)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Family", "Phase", "create_model", "get_family", "list_families"]


def create_model(family: str, net: Any = None, **sizes: Any) -> nn.Module:
    """Build a family's fusion network (untrained), from its default sizes, the ``net``
    dataclass given, and/or keyword overrides of single sizes (``channels=16``)."""
    fam = get_family(family)
    if net is None:
        net = fam.config().net
    if sizes:
        net = replace(net, **sizes)
    return fam.network_module().build(net)
