"""One module per ``pegaflow bench engine`` mode; each has ``run(settings) -> report``."""
