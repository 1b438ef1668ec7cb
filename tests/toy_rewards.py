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


def nan_every_other(prompts, completions):
    """NaN for every completion at an even position (ceil(B / 2) NaNs), 0.5 elsewhere: the non-finite guard's case."""
    return [float("nan") if i % 2 == 0 else 0.5 for i in range(len(completions))]


def inf_first_two(prompts, completions):
    """+inf and -inf for the first two completions, 0 for the rest."""
    return [float("inf"), float("-inf")] + [0.0] * (len(completions) - 2)


def one_short(prompts, completions):
    """One score too few."""
    return [0.0] * (len(completions) - 1)


def raises_value_error(prompts, completions):
    raise ValueError("cannot score an empty completion")


def returns_none(prompts, completions):
    return None


NOT_CALLABLE = 3  # reward.callable=tests.toy_rewards:NOT_CALLABLE names something that cannot be called


def nan_in_training(prompts, completions):
    """0.5 for evaluation batches (16 prompts in configs/warp/tiny.yaml), NaN for the first completion of a training
    batch (8 prompts): the guard must name the iteration, policy and step."""
    return [float("nan") if len(completions) == 8 and i == 0 else 0.5 for i in range(len(completions))]


def huge_in_training(prompts, completions):
    """Finite but huge scores in training batches (8 prompts): the batch baseline overflows and the loss is not
    finite, while every reward is."""
    return [3e38] * len(completions) if len(completions) == 8 else [0.5] * len(completions)
