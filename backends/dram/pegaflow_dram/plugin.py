"""Entry point of pegaflow-dram."""
from pegaflow_core import hookimpl


@hookimpl
def register_tiers(register):
    """Register the DRAM tier."""
