"""pytest plugin of pegaflow-conformance."""
