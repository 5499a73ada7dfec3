"""The runtime every stage stands on: config files and checks, the run contract (metrics,
checkpoints, the loop), the device mesh, multi-process start-up, the optimizer."""
