"""The independent check for every decoder path: greedy by re-running the full forward pass."""

import jax
import jax.numpy as jnp


def argmax_reference(model, params, prompt, n, length=32):
    """Greedy continuation by re-running the full forward (no cache) for every new token.

    The sequence is right-padded to `length` so one compilation serves every call: causal
    attention makes the logits at position len-1 independent of what follows.
    """
    forward = jax.jit(lambda t: model.apply(params, t, jnp.arange(length)[None])[0])
    seq = list(prompt)
    for _ in range(n):
        logits = forward(jnp.asarray([seq + [0] * (length - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]
