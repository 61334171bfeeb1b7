"""Decoding: per-row sampling, the stateless batch sampler, and the continuous-batching engine.

`sampler.generate` runs a fixed batch start to finish in one jitted loop (evaluation, benchmarks);
`engine.Engine` keeps a pool of KV-cache slots and admits requests as others finish (serving,
RL rollouts, batch jobs). Both call the same `Model.apply` and `sampling.sample`.
`soft.generate` is the fixed-batch loop for Soft Thinking (concept-token inputs while thinking).
"""
