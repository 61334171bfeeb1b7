"""Group advantages against hand-computed numbers, (P, G) and flat layouts, errors."""

import numpy as np
import pytest

from jreason.train.rl.advantages import ADVANTAGES, compute_advantages

# Two prompts, G = 4. Prompt 0: one of four right; prompt 1: all four equal.
REWARDS = np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])

# Prompt 0: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25),
#   squares sum 0.5625 + 3 * 0.0625 = 0.75, sample var 0.75 / 3 = 0.25, std 0.5.
# Prompt 1: no spread, every advantage 0.
HAND = {
    # (r - mean) / std: 0.75 / 0.5 = 1.5, -0.25 / 0.5 = -0.5
    "grpo": [[1.5, -0.5, -0.5, -0.5], [0, 0, 0, 0]],
    # r - mean
    "dr_grpo": [[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0]],
    # r_i - mean of the other three: 1 - 0 = 1; 0 - (1 + 0 + 0) / 3 = -1/3
    "rloo": [[1.0, -1 / 3, -1 / 3, -1 / 3], [0, 0, 0, 0]],
}


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_matches_hand_computation_grouped_and_flat(name):
    assert set(HAND) == set(ADVANTAGES)
    grouped = compute_advantages(name, REWARDS)
    assert grouped.shape == (2, 4)
    # grpo's eps = 1e-6 in the denominator moves 1.5 by ~3e-6
    np.testing.assert_allclose(grouped, HAND[name], atol=1e-5)
    flat = compute_advantages(name, REWARDS.reshape(-1), group_size=4)
    assert flat.shape == (8,)
    np.testing.assert_allclose(flat, np.reshape(HAND[name], -1), atol=1e-5)


def test_grpo_uses_the_sample_std():
    # G = 2, rewards (0, 1): mean 0.5, deviations +-0.5; sample std sqrt(0.5 / 1) = 0.707107
    # (population std would be 0.5 and give +-1): advantages +-0.5 / 0.707107 = +-0.707107
    np.testing.assert_allclose(
        compute_advantages("grpo", [[0.0, 1.0]]), [[-0.707107, 0.707107]], atol=1e-5
    )


def test_group_of_one_and_errors():
    np.testing.assert_allclose(compute_advantages("grpo", [[3.0], [1.0]]), [[0.0], [0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages("rloo", [[3.0], [1.0]])
    with pytest.raises(ValueError, match="group_size=3"):
        compute_advantages("grpo", np.zeros(8), group_size=3)
    with pytest.raises(ValueError, match="flat with group_size"):
        compute_advantages("grpo", np.zeros(8))
    with pytest.raises(ValueError, match="allowed"):
        compute_advantages("ppo", REWARDS)
