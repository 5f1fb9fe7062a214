"""Write the JSON Schema of every message type into ``schemas/json/``.

    python -m schemas.export          # regenerate
    python -m schemas.export --check  # exit 1 if a checked-in file is stale

Non-Python consumers (dashboards, external producers, other languages) read these files; a unit
test fails when they drift from the pydantic models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.messages import MESSAGE_TYPES

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name to content, for every message type."""
    out = {}
    for name, model in sorted(MESSAGE_TYPES.items()):
        schema = model.model_json_schema(mode="validation")
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names of files that are missing, differ from the models, or belong to no model."""
    wanted = render()
    have = {p.name for p in directory.glob("*.json")}
    bad = [n for n, text in wanted.items() if not (directory / n).is_file()
           or (directory / n).read_text(encoding="utf-8") != text]
    return sorted(bad + [n for n in have - wanted.keys()])


def write(directory: Path = JSON_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render()
    for name, text in wanted.items():
        (directory / name).write_text(text, encoding="utf-8")
    for path in directory.glob("*.json"):
        if path.name not in wanted:
            path.unlink()


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        if bad:
            print("stale JSON Schemas (run `python -m schemas.export`): " + ", ".join(bad))
            return 1
        return 0
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
