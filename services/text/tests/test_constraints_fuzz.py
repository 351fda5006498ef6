"""Fuzzing structured output: any JSON schema, within the limits or far beyond, is compiled or a clean 400.

Never another exception, never over a time bound. Seeded (derandomize) and
bounded, so it runs in `make test` and fails the same way twice.
"""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from modelplex_kit.errors import ServiceError
from modelplex_text.constraints import LIMITS, ConstraintCompiler, check_constraint
from modelplex_text.prompting import OutputConstraint

TIME_BOUND_S = 3.0
FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,  # the bound is asserted per example, with a message
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Regex pieces, good and evil: nested quantifiers, huge bounds, look-arounds, broken syntax.
PATTERN_PIECES = [
    "a", "b", "[a-z]", "\\d", ".", "(a|aa)", "(a+)", "*", "+", "?", "{3}", "{0,255}", "{0,2000}", "{1000}",
    "{2,}", "(", ")", "|", "^", "$", "(?<=a)", "[", "]", "\\", "(?i)", "\\p{L}", "{", "}", "(a{30})", "{40}",
]  # fmt: skip
patterns = st.lists(st.sampled_from(PATTERN_PIECES), max_size=12).map("".join)
sizes = st.one_of(st.integers(0, 64), st.integers(0, 10**6), st.sampled_from([LIMITS.max_length, LIMITS.max_items]))


def _bounds(names: list[str]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional={name: sizes for name in names})


strings = st.builds(
    lambda bounds, extra: {"type": "string", **bounds, **extra},
    _bounds(["minLength", "maxLength"]),
    st.fixed_dictionaries(
        {}, optional={"pattern": patterns, "format": st.sampled_from(["date-time", "email", "uuid", "bogus"])}
    ),
)
numbers = st.builds(
    lambda kind, bounds: {"type": kind, **bounds},
    st.sampled_from(["integer", "number"]),
    st.fixed_dictionaries(
        {},
        optional={
            "minimum": st.integers(-(10**30), 10**30),
            "maximum": st.integers(-(10**30), 10**30),
            "multipleOf": st.integers(1, 10**6),
        },
    ),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=8))
leaves = st.one_of(
    strings,
    numbers,
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {}, {"type": "nonsense"}]),
    st.integers(0, 3 * LIMITS.max_enum).map(lambda n: {"enum": list(range(n))}),
    scalars.map(lambda value: {"const": value}),
    st.integers(0, 3 * LIMITS.max_ref_chain).map(lambda n: _ref_chain(n)),
)


def _ref_chain(hops: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{hops}": {}}}


keys = st.text(alphabet="abcxyz_", min_size=1, max_size=6)


def _composites(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    objects = st.builds(
        lambda props, extra, bounds: {
            "type": "object",
            "properties": props,
            "required": list(props)[: len(props) // 2],
            **extra,
            **bounds,
        },
        st.dictionaries(keys, children, max_size=4),
        st.fixed_dictionaries({}, optional={"additionalProperties": st.one_of(st.booleans(), children)}),
        _bounds(["minProperties", "maxProperties"]),
    )
    arrays = st.builds(
        lambda items, bounds: {"type": "array", "items": items, **bounds}, children, _bounds(["minItems", "maxItems"])
    )
    combinators = st.builds(
        lambda key, branches: {key: branches},
        st.sampled_from(["anyOf", "oneOf", "allOf"]),
        st.lists(children, min_size=1, max_size=5),
    )
    return st.one_of(objects, arrays, combinators)


schemas = st.recursive(leaves, _composites, max_leaves=25)
# Deep and wide on purpose: beyond the nesting and anyOf limits.
deep = st.integers(1, 3 * LIMITS.max_depth).map(lambda n: _nest({"type": "string"}, n))
wide = st.integers(1, 2 * LIMITS.max_alternatives).map(lambda n: {"anyOf": [{"const": i} for i in range(n)]})


def _nest(schema: dict, levels: int) -> dict:
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


any_schema = st.one_of(schemas, deep, wide)


def assert_compiled_or_400(compile_it) -> None:
    started = time.perf_counter()
    try:
        compile_it()
        event("compiled")
    except ServiceError as error:
        assert error.status == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.param == "response_format.json_schema.schema"
        event("400: beyond the limits" if "beyond the limits" in error.message else "400: rejected by llguidance")
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_BOUND_S, f"took {elapsed:.1f}s"


@FUZZ
@given(any_schema)
def test_any_schema_is_checked_or_a_400(schema):
    assert_compiled_or_400(lambda: check_constraint(OutputConstraint("json_schema", schema)))


@pytest.fixture(scope="module")
def compiler():
    from llama_cpp import Llama

    from modelplex_text import gguf

    vocab = Llama(model_path=str(gguf.packaged_smollm2()), vocab_only=True, verbose=False)
    return ConstraintCompiler.for_llama(vocab, cache_size=4)


@settings(FUZZ, max_examples=120)
@given(any_schema)
def test_any_schema_compiles_against_the_real_vocabulary_and_masks_in_bounded_time(compiler, schema):
    def compile_and_step() -> None:
        matcher = compiler.compile(OutputConstraint("json_schema", schema)).matcher()
        for _ in range(8):  # a few steps, always taking the first allowed token
            allowed = matcher.allowed().nonzero()[0]
            if not len(allowed) or matcher.is_stopped():
                break
            matcher.consume(int(allowed[0]))

    assert_compiled_or_400(compile_and_step)
