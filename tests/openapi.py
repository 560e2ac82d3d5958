"""docs/openapi.yaml, loaded once, and a check that an answer is documented."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
METHODS = ("get", "post", "put", "delete", "patch")


@functools.cache
def spec() -> dict[str, Any]:
    return dict(yaml.safe_load(SPEC.read_text()))


def operations() -> dict[tuple[str, str], set[int]]:
    """(METHOD, path template) -> documented status codes."""
    out = {}
    for path, item in spec()["paths"].items():
        for method in METHODS:
            if method in item:
                out[(method.upper(), path)] = {int(code) for code in item[method]["responses"]}
    return out


def documented(method: str, path: str, status: int) -> bool | None:
    """Whether ``status`` is documented for the request; None when no operation matches."""
    path = path.split("?", 1)[0]
    for (m, template), codes in operations().items():
        regex = "^" + re.sub(r"\{\w+\}", "[^/]+", template) + "$"
        if m == method and re.match(regex, path):
            return status in codes
    return None
