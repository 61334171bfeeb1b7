"""Decoding: sampling, the batch sampler, and (later) the continuous-batching engine."""
