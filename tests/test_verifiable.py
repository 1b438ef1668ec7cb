"""Verifiable rewards: answer extraction (last number, GSM8K `####`, `\\boxed{}`), normalisation, and the scorers."""

from __future__ import annotations

import pytest
import torch

from warp_dist.rewards.scorers import RewardError
from warp_dist.rewards.verifiable import (
    MODES,
    FormatReward,
    VerifiableReward,
    extract_answer,
    has_format,
    is_correct,
    normalize,
    reference_answer,
)

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


@pytest.mark.parametrize("text, mode, expected", [
    ("3 + 4 = 7", "last_number", "7"),  # the last number wins over earlier ones
    ("The answer is 42.", "last_number", "42"),  # a sentence period is not a decimal point
    ("It dropped to -3 degrees", "last_number", "-3"),
    ("In total 1,234.5 dollars", "last_number", "1,234.5"),
    ("about .5 of it", "last_number", ".5"),
    ("so x2", "last_number", "2"),  # glued to a word still counts
    ("10-3 is what remains", "last_number", "3"),  # a minus after a digit is an operator, not a sign
    ("no numbers here", "last_number", None),
    ("She has 5 apples.\n#### 72\nDone, 9 left", "hash", "72"),
    ("#### 1\n#### 2 ", "hash", "2"),
    ("####   \n", "hash", None),
    ("just 5", "hash", None),
    (r"so \boxed{\frac{1}{2}}", "boxed", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{1} no, \boxed{ 2 }", "boxed", "2"),  # the last box wins
    (r"\boxed{3", "boxed", None),  # never closed
    ("answer: 3", "boxed", None),
    (r"\boxed{5} and then 6", "auto", "5"),  # auto: a box beats a later plain number
    ("#### 8\nand 9 more", "auto", "8"),  # auto: #### beats a later plain number
    ("3 + 4 = 7", "auto", "7"),
    ("nothing", "auto", None),
])
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="last_number"):
        extract_answer("1", "first_number")


@pytest.mark.parametrize("raw, expected", [
    ("3.0", "3"),
    ("-0", "0"),
    ("+5", "5"),
    ("1,000", "1000"),
    ("0.50", "0.5"),
    ("1/2", "0.5"),
    (r"\frac{1}{2}", "0.5"),
    (r"-\dfrac{3}{4}", "-0.75"),
    ("2/6", "1/3"),  # no exact decimal: the reduced fraction
    (" $1,234$. ", "1234"),
    (r"\text{ Yes }", "yes"),
    ("  New   York ", "new york"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("truth, expected", [
    (7, "7"),
    (7.0, "7"),
    (2.5, "2.5"),
    (0.1, "0.1"),
    (GSM8K_SOLUTION, "72"),
    ("Thus\n#### 1,234", "1234"),
    (r"hence $\boxed{\frac{3}{6}}$", "0.5"),
    ("Paris", "paris"),
    ("", None),
    (None, None),
    (float("nan"), None),
])
def test_reference_answer(truth, expected):
    assert reference_answer(truth) == expected


@pytest.mark.parametrize("completion, truth, mode, expected", [
    ("Natalia sold 72 clips.", GSM8K_SOLUTION, "auto", True),
    ("She sold 48 then 24, so 48 + 24 = 72.\n#### 72", GSM8K_SOLUTION, "auto", True),
    ("#### 71", GSM8K_SOLUTION, "auto", False),
    ("The total is 1,234", "1234", "auto", True),
    ("The total is 1234", "1,234", "auto", True),
    ("It costs $2.50.", "2.5", "auto", True),
    ("It costs 2.5", 2.5, "auto", True),
    (r"\boxed{1/2}", "0.5", "auto", True),
    (r"\boxed{\frac{1}{2}}", 0.5, "auto", True),
    ("Half: 1/2", "0.5", "last_number", False),  # last_number sees only the 2
    ("The temperature is -3.", "-3", "auto", True),
    ("The temperature is 3.", "-3", "auto", False),
    ("3 + 4 = 7", 7, "auto", True),
    ("3 + 4 = 7", 4, "auto", False),
    (r"\boxed{7} (check: 7 + 1 = 8)", 7, "auto", True),
    (r"\boxed{7} (check: 7 + 1 = 8)", 8, "last_number", True),
    ("I do not know", 7, "auto", False),
    ("#### 7", 7, "boxed", False),  # wrong format for the mode
    ("The answer is 7", "", "auto", False),  # an empty reference matches nothing
])
def test_is_correct(completion, truth, mode, expected):
    assert is_correct(completion, truth, mode) is expected


def test_has_format():
    assert has_format("it is 3") and not has_format("it is three")
    assert has_format(r"\boxed{x}", "boxed") and not has_format("x = 3", "boxed")
    assert has_format("#### 3", "hash") and not has_format("3", "hash")
    assert [has_format(r"\boxed{1}", m) for m in MODES] == [True, True, False, True]


def test_verifiable_reward_scores_a_batch():
    reward = VerifiableReward()
    completions = [" 3 + 4 = 7", " 3 + 4 = 8", r" so \boxed{1/2}.", " #### 1,234", " no idea", " -3"]
    rows = [{"answer": 7}, {"answer": "7"}, {"answer": "0.5"}, {"answer": "Add.\n#### 1234"}, {"answer": 1},
            {"answer": "3"}]
    out = reward(["Q: "] * len(completions), completions, rows=rows)
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_verifiable_reward_reads_only_the_completion():
    out = VerifiableReward(answer_column="label")(["What is 2 + 5? "], ["I think 6"], rows=[{"label": 7}])
    assert out.tolist() == [0.0]


def test_verifiable_reward_extract_mode_and_bad_mode():
    completions = ["#### 5", r"\boxed{5}"]
    rows = [{"answer": 5}, {"answer": 5}]
    assert VerifiableReward(extract="boxed")(["", ""], completions, rows=rows).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="boxed"):
        VerifiableReward(extract="box")


@pytest.mark.parametrize("rows", [None, [{"answer": 1}], [{}, {}]])
def test_verifiable_reward_without_columns(rows):
    with pytest.raises(RewardError) as info:
        VerifiableReward()(["a", "b"], ["1", "2"], rows=rows)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("reward.kind=verifiable needs the dataset's answer column")
    assert "data.source=dataset or arithmetic" in msg


def test_verifiable_reward_missing_column_names_the_present_ones():
    with pytest.raises(RewardError) as info:
        VerifiableReward()(["a"], ["1"], rows=[{"question": "a", "solution": "#### 1"}])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("reward.answer_column='answer'")
    assert "[question, solution]" in msg


def test_verifiable_reward_error_carries_the_position():
    with pytest.raises(RewardError, match=r"^step 3: reward.kind=verifiable"):
        VerifiableReward()(["a"], ["1"], where="step 3", rows=None)


def test_format_reward():
    completions = ["it is 3", "no number", r"\boxed{x}", "#### seven"]
    out = FormatReward()(["p"] * 4, completions)
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert FormatReward(extract="hash")(["p"] * 4, completions).tolist() == [0.0, 0.0, 0.0, 1.0]
