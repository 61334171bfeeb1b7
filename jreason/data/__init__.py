"""Data: procedural reasoning tasks with verifiers, answer checking for real datasets, pipelines."""
