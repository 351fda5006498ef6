"""Structured output: hostile schemas are a 400 naming the parameter, in bounded time; valid ones are enforced."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from modelplex.v1 import text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.constraints import (
    LIMITS,
    ConstraintCompiler,
    LogitsMask,
    check_constraint,
    check_request,
)
from modelplex_text.prompting import OutputConstraint, tool_call_schema

SCHEMA_PARAM = "response_format.json_schema.schema"
# Compiling one schema, hostile or not, stays far below this.
TIME_BOUND_S = 3.0


def string_property(**rules) -> dict:
    return {"type": "object", "properties": {"x": {"type": "string", **rules}}, "required": ["x"]}


def ref_chain(hops: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    defs[f"d{hops}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def any_of_explosion(groups: int, width: int) -> dict:
    """allOf of anyOfs: a naive compiler multiplies them out (width ** groups)."""
    return {
        "allOf": [
            {"anyOf": [{"type": "object", "properties": {f"k{g}_{w}": {"type": "integer"}}} for w in range(width)]}
            for g in range(groups)
        ]
    }


# The bodies from the issue, then worse ones.
HOSTILE = {
    "bounded repetition (crashed llama.cpp)": string_property(pattern="^a{0,2000}$"),
    "huge maxLength (crashed llama.cpp)": {"type": "string", "maxLength": 100000},
    "nested repetition (froze llama.cpp)": string_property(pattern="^(a|aa)*{1000}b$"),
    "repetition inside a group": string_property(pattern="(ab{3}){0,999}"),
    "nested repetitions multiplying": string_property(pattern="^((a{200}){200}){200}$"),
    "numbers beyond 64 bits": {"type": "integer", "minimum": -(10**30), "maximum": 10**30},
    "huge enum": {"enum": list(range(5_000))},
    "deep $ref chain": ref_chain(2_000),
    "$ref cycle": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    "anyOf explosion": any_of_explosion(groups=40, width=8),
    "deep nesting": nested(200),
    "huge maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": 10**9},
    "long pattern": string_property(pattern="a" * 5_000),
    "schema too big": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5_000)}},
    "look-around (rejected by llguidance)": string_property(pattern="(?<=a)b"),
    "unknown $ref": {"$ref": "#/$defs/missing"},
    "not an object": ["type", "string"],
}


def assert_invalid(call, param: str) -> ServiceError:
    started = time.perf_counter()
    with pytest.raises(ServiceError) as caught:
        call()
    assert time.perf_counter() - started < TIME_BOUND_S
    error = caught.value
    assert error.status == grpc.StatusCode.INVALID_ARGUMENT and error.param == param
    assert error.message and "Traceback" not in error.message
    return error


@pytest.mark.parametrize("schema", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_response_format_is_a_400_naming_the_schema(schema):
    assert_invalid(lambda: check_constraint(OutputConstraint("json_schema", schema)), SCHEMA_PARAM)


def test_the_error_says_which_rule_and_where():
    huge_enum = OutputConstraint("json_schema", HOSTILE["huge enum"])
    error = assert_invalid(lambda: check_constraint(huge_enum), SCHEMA_PARAM)
    assert "enum" in error.message and str(LIMITS.max_enum) in error.message
    error = assert_invalid(
        lambda: check_constraint(OutputConstraint("json_schema", string_property(pattern="^a{0,2000}$"))),
        SCHEMA_PARAM,
    )
    assert "2000" in error.message and "/properties/x" in error.message


def tool(name: str, parameters: dict) -> text_pb2.Tool:
    return text_pb2.Tool(name=name, parameters_json=json.dumps(parameters))


GOOD = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize("mode", [text_pb2.ToolChoice.MODE_AUTO, text_pb2.ToolChoice.MODE_REQUIRED])
def test_a_hostile_tool_is_blamed_by_its_index(mode):
    request = text_pb2.GenerateRequest(
        chat=text_pb2.ChatInput(messages=[text_pb2.ChatMessage(role="user")]),
        tools=[tool("ok", GOOD), tool("also_ok", GOOD), tool("evil", HOSTILE["nested repetition (froze llama.cpp)"])],
        tool_choice=text_pb2.ToolChoice(mode=mode),
    )
    assert_invalid(lambda: check_request(request), "tools[2].function.parameters")


def test_a_named_tool_keeps_its_index_in_the_request():
    request = text_pb2.GenerateRequest(
        chat=text_pb2.ChatInput(messages=[text_pb2.ChatMessage(role="user")]),
        tools=[tool("ok", GOOD), tool("evil", HOSTILE["huge maxLength (crashed llama.cpp)"])],
        tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_NAMED, function_name="evil"),
    )
    assert_invalid(lambda: check_request(request), "tools[1].function.parameters")


def test_the_response_format_of_a_request_is_checked():
    request = text_pb2.GenerateRequest(
        completion=text_pb2.CompletionInput(prompt="hi"),
        response_format=text_pb2.ResponseFormat(
            type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema_json=json.dumps(HOSTILE["deep $ref chain"])
        ),
    )
    assert_invalid(lambda: check_request(request), SCHEMA_PARAM)


@pytest.mark.parametrize(
    "schema",
    [
        string_property(pattern="(a+)+$"),  # raised an AssertionError in llama.cpp's converter: fine here
        string_property(pattern="^[a-z]{1,256}$", maxLength=LIMITS.max_length),
        string_property(pattern="^((a{8}){8}){16}$"),  # nested, multiplying to the limit (1024)
        {"enum": list(range(LIMITS.max_enum))},
        ref_chain(LIMITS.max_ref_chain),
        nested(20),
        {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}},
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}},
        True,
    ],
    ids=[
        "nested-plus",
        "bounded",
        "nested-bounds",
        "enum-at-limit",
        "ref-chain-at-limit",
        "nested-20",
        "recursive",
        "unique",
        "true",
    ],
)
def test_schemas_within_the_limits_compile(schema):
    started = time.perf_counter()
    assert check_constraint(OutputConstraint("json_schema", schema))
    assert time.perf_counter() - started < TIME_BOUND_S


def test_json_object_and_tool_kinds_compile():
    assert check_constraint(OutputConstraint("json_object"))
    tools = [tool("a", GOOD), tool("b", {})]
    for kind in ("tool_call", "tool_call_or_text"):
        assert check_constraint(OutputConstraint(kind, tool_call_schema(tools), (0, 1)))


# -- token level, with the real SmolLM2 vocabulary ------------------------------


@pytest.fixture(scope="module")
def compiler():
    from llama_cpp import Llama

    from modelplex_text import gguf

    vocab = Llama(model_path=str(gguf.packaged_smollm2()), vocab_only=True, verbose=False)
    return ConstraintCompiler.for_llama(vocab)


def greedy_walk(matcher, steps: int) -> bytes:
    """Follows the mask with the lowest allowed token id: a stand-in for a model, fully deterministic."""
    tokens = []
    for _ in range(steps):
        allowed = np.flatnonzero(matcher.allowed())
        choices = [t for t in allowed if t not in matcher.eos_tokens]
        if not choices:
            break
        matcher.consume(int(choices[0]))
        tokens.append(int(choices[0]))
    return tokens


def test_hostile_schemas_are_a_400_with_the_tokenizer_too(compiler):
    for schema in HOSTILE.values():
        assert_invalid(lambda schema=schema: compiler.compile(OutputConstraint("json_schema", schema)), SCHEMA_PARAM)


def test_compiled_constraints_are_cached(compiler):
    first = compiler.compile(OutputConstraint("json_schema", GOOD))
    assert first is compiler.compile(OutputConstraint("json_schema", json.loads(json.dumps(GOOD))))
    assert first.matcher() is not first.matcher()  # one matcher per sequence


def test_the_mask_forces_schema_valid_output_and_eos_only_at_the_end(compiler):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    matcher = compiler.compile(OutputConstraint("json_schema", schema)).matcher()
    assert not set(np.flatnonzero(matcher.allowed())) & set(matcher.eos_tokens)  # nothing yet: no EOS
    # Drive it with the tokens of a valid answer: each must be allowed, then EOS is.
    vocab_model = compiler.tokenizer
    for token in vocab_model.tokenize_str('{"name": "Ada", "n": 7}'):
        assert matcher.allowed()[token]
        matcher.consume(token)
    assert matcher.is_accepting()
    assert set(np.flatnonzero(matcher.allowed())) <= set(matcher.eos_tokens)


def test_pathological_but_valid_patterns_keep_every_mask_fast(compiler):
    for pattern in ("(a+)+$", "^(a|aa)*b$", "^((a|b)*c)*(a|b)*$", "^([a-z]+\\d*)+@x$"):
        matcher = compiler.compile(OutputConstraint("json_schema", string_property(pattern=pattern))).matcher()
        greedy_walk(matcher, 40)
        assert max(matcher.mask_seconds) < 0.5


def test_logits_mask_consumes_the_sampled_tokens_from_input_ids(compiler):
    constraint = compiler.compile(OutputConstraint("json_object"))
    mask = LogitsMask(constraint.matcher())
    prompt = np.array([1, 2, 3], dtype=np.intc)
    scores = np.zeros(compiler.tokenizer.vocab_size, dtype=np.single)
    mask(prompt, scores)
    brace = compiler.tokenizer.tokenize_str("{")[0]
    assert scores[brace] == 0 and np.isinf(scores).sum() > 0.9 * len(scores)
    wrong = compiler.tokenizer.tokenize_str("x")[0]
    scores = np.zeros_like(scores)
    # The model "sampled" a token the mask forbade (it cannot, but say it did): the
    # processor must not raise inside llama.cpp's callback; it ends with EOS and the
    # stopping criterion raises the 400.
    mask(np.append(prompt, wrong), scores)
    assert set(np.flatnonzero(np.isfinite(scores))) <= set(mask.matcher.eos_tokens)
    with pytest.raises(ServiceError) as caught:
        mask.stop_on_error(prompt, scores)
    assert caught.value.param == SCHEMA_PARAM


def test_objects_that_list_their_properties_get_no_others_unless_they_say_so(compiler):
    def accepts(schema: dict, text: str) -> bool:
        matcher = compiler.compile(OutputConstraint("json_schema", schema)).matcher()
        for token in compiler.tokenizer.tokenize_str(text):
            if not matcher.allowed()[token]:
                return False
            matcher.consume(token)
        return matcher.is_accepting()

    listed = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert accepts(listed, '{"a": 1}') and not accepts(listed, '{"a": 1, "b": 2}')
    assert accepts({**listed, "additionalProperties": True}, '{"a": 1, "b": 2}')
    assert accepts({"type": "object"}, '{"b": 2}')  # a free-form object stays free


@pytest.mark.parametrize(
    ("pattern", "largest", "product"),
    [
        ("^a{0,2000}$", 2000, 2000),
        ("(ab{3}){10}", 10, 30),
        ("((a{8}){8}){16}", 16, 1024),
        ("(a{200})*b{5}", 200, 200),
        ("\\{1000\\}[{]{7}", 7, 7),  # escaped braces are text; a class is one atom
        ("[a{99}]x", 0, 1),  # braces inside a class are characters
        ("(a|aa)*{1000}b", 1000, 1000),
    ],
)
def test_repetition_bounds_are_read_from_patterns(pattern, largest, product):
    from modelplex_text.constraints import _repetition_bounds

    assert _repetition_bounds(pattern) == (largest, product)
