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
