"""pegaflow DRAM tier."""
