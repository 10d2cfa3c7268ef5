"""Built-in plugin: loopback."""
from pegaflow_core.hookspecs import hookimpl
