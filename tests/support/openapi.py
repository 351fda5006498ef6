"""Validates responses against OpenAI's published OpenAPI schemas (tests/spec/)."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[1] / "spec" / "openai-openapi.yaml"


def _nullable_to_union(node: Any) -> Any:
    """OpenAPI's `nullable: true` is not JSON Schema; rewrite it as a union with null."""
    if isinstance(node, list):
        return [_nullable_to_union(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_union(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=1)
def _registry() -> tuple[Registry, dict]:
    spec = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    spec = {"components": _nullable_to_union(copy.deepcopy(spec["components"]))}
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return Registry().with_resource("urn:openai", resource), spec


def validate(instance: Any, schema_name: str) -> None:
    """Raises jsonschema.ValidationError if `instance` does not match components/schemas/<schema_name>."""
    registry, _ = _registry()
    validator = Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=registry)
    validator.validate(instance)


@lru_cache(maxsize=8)
def _members(union: str) -> dict[str, str]:
    """The members of a `type`-tagged anyOf union: event type -> schema name."""
    _, spec = _registry()
    members = {}
    for ref in spec["components"]["schemas"][union]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[-1]
        kind = spec["components"]["schemas"][name].get("properties", {}).get("type", {})
        for value in kind.get("enum", ()):
            members[value] = name
    return members


def validate_event(event: dict[str, Any], union: str = "ResponseStreamEvent") -> None:
    """Validates a streamed event against the member of `union` its `type` names: the same check as the
    union's anyOf, with a failure that says what is wrong instead of "not valid under any"."""
    name = _members(union).get(event.get("type"))
    if name is None:
        raise AssertionError(f"{event.get('type')!r} is not a member of {union}")
    validate(event, name)
