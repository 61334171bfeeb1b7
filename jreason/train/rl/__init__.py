"""RL for reasoning: small pure pieces registered by name, and (later) the loop around them.

    rewards.py     REWARDS: score one completion (verifier, format, L1 length, DAPO overlong)
    advantages.py  ADVANTAGES: group rewards -> advantages (GRPO, Dr. GRPO, RLOO)
    losses.py      LOSSES: the clipped policy loss on the shared train step; AGGREGATIONS:
                   per-token weights that make GRPO / Dr. GRPO / DAPO / Delethink means exact
                   under gradient accumulation; `token_logprobs` for recomputing log-probs

Rollouts come from the decode engine (`jreason.decode.engine`), never from a second sampler.
"""
