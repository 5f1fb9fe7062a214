"""Declared answer checks: exact, numeric, math-answer and regular-expression match, and
answer schemas.

Used by environments whose tasks carry a ``VerifierSpec`` (task sets, the ``reference``
environment) and by the scorer. Instruct models answer in prose, so the final answer is
*extracted* first, by an ordered list of rules (``params.extract``): the first rule that finds
something wins.

- ``boxed``: the content of the last ``\\boxed{...}`` (braces balanced);
- ``answer_is``: what follows the last "answer is" / "answer:" to the end of its
  sentence;
- ``hashes``: what follows the last ``####`` (GSM8K's convention);
- ``last_number`` / ``first_number``: the last / first number in the text.

``math`` (default rules: boxed, answer_is, hashes, last_number) compares the extraction with
the answer as numbers when both read as one (``1,234``, ``-3.50``, ``3/4``, ``\\frac{3}{4}``),
else as normalised strings. ``numeric`` keeps its old default (the first number) unless
``params.extract`` says otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import jsonschema

from schemas import VerifierSpec
from services.common.errors import ConfigError

_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def first_integer(text: str) -> int | None:
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


RULES = ("boxed", "answer_is", "hashes", "last_number", "first_number")
MATH_RULES = ("boxed", "answer_is", "hashes", "last_number")

# A number: digits with optional thousands commas, a decimal part, an exponent; a sign only
# where it cannot be a hyphen inside a word or a date ("x-2", "2024-01-02").
_NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w])" \
    r"|(?<![\w.])-?\.\d+(?![\w])"
_ANY_NUMBER = re.compile(_NUM)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_TO_SENTENCE_END = re.compile(r"\s*:?\s*(.*?)(?:\.(?=\s|$)|\n|$)")
_HASHES = re.compile(r"####\s*([^\n]*)")
_FRACTION = re.compile(r"^(-?\d+)\s*/\s*(-?\d+)$")
_LATEX_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the model stopped mid-answer


def extract(text: str, rules: Sequence[str]) -> tuple[str | None, str | None]:
    """The final answer in ``text`` by the first of ``rules`` that finds one, and that rule."""
    for rule in rules:
        found: str | None = None
        if rule == "boxed":
            found = _last_boxed(text)
        elif rule == "answer_is":  # the last statement, to the end of its sentence
            last = next(iter(reversed(list(_ANSWER_IS.finditer(text)))), None)
            span = _TO_SENTENCE_END.match(text, last.end()) if last else None
            found = span.group(1) if span else None
        elif rule == "hashes":
            matches = _HASHES.findall(text)
            found = matches[-1] if matches else None
        elif rule in ("last_number", "first_number"):
            numbers = _ANY_NUMBER.findall(text)
            found = (numbers[-1] if rule == "last_number" else numbers[0]) if numbers else None
        else:
            raise ConfigError(f"unknown answer extraction rule {rule!r}; one of {RULES}")
        if found is not None and found.strip():
            return found.strip(), rule
    return None, None


def as_number(text: str) -> float | None:
    """``text`` read as one number: ``1,234``, ``-3.5``, ``3/4``, ``\\frac{3}{4}``, with a
    leading ``$`` and a trailing unit-free full stop allowed; None when it is not one."""
    t = text.strip().strip("$").strip()
    t = t.removeprefix("\\$").rstrip(".").strip()
    if (m := _LATEX_FRAC.match(t)) or (m := _FRACTION.match(t)):
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.re is _LATEX_FRAC \
            else ("", m.group(1), m.group(2))
        if int(den) == 0:
            return None
        return (-1 if sign else 1) * int(num) / int(den)
    if _ANY_NUMBER.fullmatch(t):
        return float(t.replace(",", ""))
    # "42 apples", "x = 42": one number inside a short answer span
    numbers = _ANY_NUMBER.findall(t)
    return float(numbers[0].replace(",", "")) if len(numbers) == 1 else None


def _rules(spec: VerifierSpec, default: Sequence[str]) -> list[str]:
    rules = spec.params.get("extract", list(default))
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, list) or not rules or any(r not in RULES for r in rules):
        raise ConfigError(f"params.extract must list rules from {RULES}, got {rules!r}")
    return rules


def _normal(text: str) -> str:
    return " ".join(text.strip().strip("$").rstrip(".").split()).casefold()


def check(spec: VerifierSpec, completion: str) -> tuple[bool, dict[str, object]]:
    """Whether ``completion`` satisfies ``spec``, with what was extracted and compared."""
    if spec.kind == "math":
        want = spec.answer
        if want is None:
            raise ConfigError("a math verifier needs an answer")
        got, rule = extract(completion, _rules(spec, MATH_RULES))
        if got is None:
            return False, {"extracted": None}
        got_n, want_n = as_number(got), as_number(want)
        tolerance = float(spec.params.get("tolerance", 1e-6))
        if got_n is not None and want_n is not None:
            ok = math.isclose(got_n, want_n, rel_tol=0, abs_tol=tolerance)
        else:
            ok = _normal(got) == _normal(want)
        return ok, {"extracted": got, "rule": rule}
    if spec.kind == "exact":
        got = completion.strip()
        want = (spec.answer or "").strip()
        if spec.params.get("case_insensitive"):
            got, want = got.lower(), want.lower()
        return got == want, {"extracted": got}
    if spec.kind == "numeric":
        want_num = float(spec.answer) if spec.answer is not None else math.nan
        if "extract" in spec.params:
            span, _ = extract(completion, _rules(spec, ()))
            got_num = as_number(span) if span is not None else None
        else:
            got_num = first_number(completion)
        tolerance = float(spec.params.get("tolerance", 1e-9))
        ok = got_num is not None and math.isclose(got_num, want_num, rel_tol=0, abs_tol=tolerance)
        return ok, {"extracted": got_num}
    if spec.kind == "regex":
        pattern = spec.params.get("pattern") or spec.answer
        if not pattern:
            raise ConfigError("a regex verifier needs params.pattern or answer")
        return re.search(str(pattern), completion) is not None, {"pattern": pattern}
    if spec.kind == "json_schema":
        return _check_json(spec, completion)
    raise ConfigError(f"verifier kind {spec.kind!r} is not checked here")


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _check_json(spec: VerifierSpec, completion: str) -> tuple[bool, dict[str, object]]:
    """The completion (or its first fenced block) parses as JSON and satisfies
    ``params.schema`` (JSON Schema); with ``answer``, it must also equal ``answer`` parsed."""
    schema = spec.params.get("schema")
    if not isinstance(schema, dict):
        raise ConfigError("a json_schema verifier needs params.schema (an object)")
    fenced = _FENCE.search(completion)
    text = fenced.group(1) if fenced else completion
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, {"error": f"not JSON: {exc.msg}"}
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return False, {"error": exc.message[:200]}
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"params.schema is not a valid JSON Schema: {exc.message}") from exc
    if spec.answer is not None and value != json.loads(spec.answer):
        return False, {"error": "valid, but not the expected answer"}
    return True, {}
