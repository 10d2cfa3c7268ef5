"""pegaflow's GPU data path (memory kind ``cuda_ipc``); see docs/gpu.md."""
