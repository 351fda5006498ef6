"""Reads a Dockerfile into instructions and stages, and a .dockerignore into a path filter."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    buffer = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, "dangling line continuation"
    out = []
    for line in logical:
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def stages(instrs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in instrs:
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, args))
    return result


def exec_form(args: str) -> list[str]:
    """The JSON array of an ENTRYPOINT, CMD or HEALTHCHECK ... CMD instruction."""
    return json.loads(args[args.index("[") :])


def ignored(dockerignore: Path) -> callable:
    """A predicate on context-relative paths ("libs/x/__pycache__"): excluded from the build context?"""
    patterns = [p.strip().rstrip("/") for p in dockerignore.read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def matches(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            if pattern.startswith("**/"):
                if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
                return True
        return False

    return matches
