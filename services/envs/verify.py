"""Declared answer checks: exact, numeric and regular-expression match, and answer schemas.

Used by environments whose tasks carry a ``VerifierSpec`` (file tasks, the ``reference``
environment) and by the scorer. Answers are extracted from free text: the first integer or
number in the completion, unless the spec says otherwise.
"""

from __future__ import annotations

import json
import math
import re

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


def check(spec: VerifierSpec, completion: str) -> tuple[bool, dict[str, object]]:
    """Whether ``completion`` satisfies ``spec``, with what was extracted and compared."""
    if spec.kind == "exact":
        got = completion.strip()
        want = (spec.answer or "").strip()
        if spec.params.get("case_insensitive"):
            got, want = got.lower(), want.lower()
        return got == want, {"extracted": got}
    if spec.kind == "numeric":
        want_num = float(spec.answer) if spec.answer is not None else math.nan
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
