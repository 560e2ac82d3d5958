from typing import Any

from gehirn_ts.web.api import Api
from tests.openapi import operations, spec


def routes() -> dict[tuple[str, str], set[int]]:
    api = Api(*([None] * 7))  # type: ignore[arg-type]
    return {(r.method, r.template): set(r.statuses) for r in api.routes()}


def test_every_route_is_documented_with_exactly_its_status_codes():
    documented = operations()
    implemented = routes()
    assert set(documented) == set(implemented)
    for key, codes in implemented.items():
        assert documented[key] == codes, key


def test_spec_is_openapi_3_and_refs_resolve():
    doc = spec()
    assert doc["openapi"].startswith("3.")

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [
                r for v in node.values() for r in refs(v)
            ]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        node: Any = doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        assert node is not None
