"""Training: the SFT and RL loops and the pieces they share (state, step, metrics)."""
