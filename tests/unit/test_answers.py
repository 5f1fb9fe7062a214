"""Final answers extracted from a model's prose, rule by rule, with adversarial outputs."""

from __future__ import annotations

import pytest

from schemas import VerifierSpec
from services.common.errors import ConfigError
from services.envs.verify import MATH_RULES, as_number, check, extract


@pytest.mark.parametrize(("text", "rules", "want"), [
    # boxed: the last one, braces balanced, nested braces kept
    ("so \\boxed{12} and then \\boxed{13}", ["boxed"], "13"),
    ("\\boxed{\\frac{1}{2}}", ["boxed"], "\\frac{1}{2}"),
    ("\\boxed{12", ["boxed"], None),  # cut off mid-answer: nothing, not '12'
    ("\\boxed{}", ["boxed"], None),
    # answer is: the last statement, to the end of its line
    ("The answer is 7.\nCheck: 3 + 4", ["answer_is"], "7"),
    ("The answer is 3.5 litres. Then 4", ["answer_is"], "3.5 litres"),
    ("I think the answer is 5. No wait, the answer is 6", ["answer_is"], "6"),
    ("Answer: -3", ["answer_is"], "-3"),
    ("answer = 42", ["answer_is"], "42"),
    # hashes (GSM8K)
    ("work...\n#### 1,234", ["hashes"], "1,234"),
    # numbers
    ("23 + 58 = 81", ["last_number"], "81"),
    ("23 + 58 = 81", ["first_number"], "23"),
    ("on 2024-01-02 it was -5 degrees", ["last_number"], "-5"),
    ("x-2 is not minus two", ["last_number"], "2"),  # a hyphen after a word is no sign
    ("costs 1,000,000 dollars", ["last_number"], "1,000,000"),
    ("version v2 of item3", ["last_number"], None),  # digits inside words are no numbers
    ("no digits at all", list(MATH_RULES), None),
    ("", list(MATH_RULES), None),
])
def test_each_rule(text: str, rules: list[str], want: str | None) -> None:
    assert extract(text, rules)[0] == want


def test_rules_are_tried_in_order_and_the_first_that_finds_wins() -> None:
    text = "The answer is 8. Therefore \\boxed{9}. Final: 10"
    assert extract(text, MATH_RULES) == ("9", "boxed")
    assert extract(text, ["answer_is", "boxed"]) == ("8", "answer_is")
    assert extract("it is 4 then 5", MATH_RULES) == ("5", "last_number")


@pytest.mark.parametrize(("text", "want"), [
    ("42", 42.0), ("42.", 42.0), ("$1,234", 1234.0), ("-3.50", -3.5), ("3/4", 0.75),
    ("\\frac{3}{4}", 0.75), ("-\\frac{1}{2}", -0.5), ("\\dfrac{6}{3}", 2.0), ("1e3", 1000.0),
    ("42 apples", 42.0), ("x = 7", 7.0), ("1/0", None), ("3 or 4", None), ("seven", None),
])
def test_as_number(text: str, want: float | None) -> None:
    assert as_number(text) == want


def test_math_verifier_on_instruct_style_answers() -> None:
    spec = VerifierSpec(kind="math", answer="81")
    assert check(spec, "23 + 58 = 81")[0]
    assert check(spec, "Let me add: 23 + 58. The answer is 81.")[0]
    assert check(spec, "The answer is $81$.")[0]
    assert not check(spec, "23 + 58 = 129")[0]  # what the pretrained model says, greedy
    assert not check(spec, "The answer is 81 or 82")[0]  # two candidates: no credit
    assert not check(spec, "81 is wrong; it is 82")[0]
    assert not check(spec, "")[0]
    long = "9" * 5000  # a runaway completion does not crash or match
    assert not check(spec, long)[0]
    fraction = VerifierSpec(kind="math", answer="0.5")
    assert check(fraction, "so \\boxed{\\frac{1}{2}}")[0]
    words = VerifierSpec(kind="math", answer="Paris")
    assert check(words, "The answer is paris.")[0]
    assert not check(words, "The answer is London")[0]


def test_numeric_keeps_first_number_unless_told_and_bad_rules_are_refused() -> None:
    assert not check(VerifierSpec(kind="numeric", answer="81"), "23 + 58 = 81")[0]
    told = VerifierSpec(kind="numeric", answer="81", params={"extract": ["last_number"]})
    assert check(told, "23 + 58 = 81")[0]
    with pytest.raises(ConfigError, match="extract"):
        check(VerifierSpec(kind="math", answer="1", params={"extract": ["guess"]}), "1")
    with pytest.raises(ConfigError, match="needs an answer"):
        check(VerifierSpec(kind="math"), "1")
