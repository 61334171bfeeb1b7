"""Batch jobs on the host side: reading prompt files, resumable result files, eval metrics.

`records` is the file side of `jreason generate` (validated requests in, one fsynced JSONL line
per finished sample out, resume by key); `evaluate` turns graded rows into pass@k / maj@k tables
and an accuracy-vs-thinking-tokens plot for `jreason eval`. Neither imports JAX: the model side
of a job lives in `jreason.decode`.
"""
