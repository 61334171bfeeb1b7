"""jreason: a JAX-native stack for training and serving reasoning language models.

The package is laid out along the two ways data flows (see README):
training (config -> data -> model -> train step -> checkpoint) and
inference (checkpoint -> model -> decode engine -> serve / jobs / RL rollouts).
Nothing here keeps global mutable state at import time.
"""

__version__ = "0.1.0"
