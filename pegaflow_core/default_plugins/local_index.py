"""Built-in plugin: local_index."""
from pegaflow_core.hookspecs import hookimpl
