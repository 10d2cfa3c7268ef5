"""Contract test classes for pegaflow backends.

A backend's ``tests/test_contract.py`` subclasses one of these in a ``Test*`` class and overrides
its factory fixture (``tier_factory``, ``index_factory`` or ``transport_factory``); see
docs/backend-authoring.md. ``pytest --pegaflow-conformance`` runs them against every installed plugin.
"""

from .index import IndexContract
from .tier import TierContract
from .transport import TransportContract

__all__ = ["IndexContract", "TierContract", "TransportContract"]
