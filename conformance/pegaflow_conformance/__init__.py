"""Contract test classes for pegaflow backends."""
