"""What every stage stands on: stage list, identity, params, paths, storage, training loop, processes, checkpoints."""
