"""Rewards for tests, importable as `tests.toy_rewards:<name>` by the callable reward."""


def share_of_e(prompts, completions):
    """Fraction of the completion's characters that are the letter 'e': easy to learn, varied at random init."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def fail_on_rank_1(prompts, completions):
    """VADER-free reward that raises on rank 1 only: the failure-propagation test's trigger."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return [0.0] * len(completions)
