"""Plugins that ship inside pegaflow-core. They register through the same hooks as any other."""
