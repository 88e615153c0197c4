"""Run plumbing apart from the method: checkpoints, the lock, signals, records, logs, the mesh."""
