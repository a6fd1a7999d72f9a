"""Where the optimizers meet the rest of PyTorch: CUDA graphs, FSDP2 / DTensor shards, BatchNorm."""
