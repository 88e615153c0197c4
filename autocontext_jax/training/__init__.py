"""Training the pyramid: state, step, loop, losses, checkpoints, logs, devices."""
