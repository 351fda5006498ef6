"""Structured output that hostile schemas cannot crash or hang.

Tools and JSON schemas are compiled by llguidance, a Rust engine built for
pathological regexes and grammars: compiling and each token mask run on a fixed
budget ("fuel"), and running out is an error state, never a crash or a busy
loop. Fuel does not bound everything (nested repetition counts such as
``((a{200}){200}){200}`` took 10 s for one mask before failing), so schemas are
first checked against stated limits: a schema beyond them is a 400 naming the
parameter it came from, on every engine (the servicer checks before any
adapter, local or remote, sees the request).

Three layers, each usable on its own:

- :func:`check_constraint`: pure validation (limits, then an llguidance compile
  without a tokenizer). Raises ``invalid(..., param)``.
- :class:`ConstraintCompiler`: per model (tokenizer); ``compile`` validates,
  builds the token-level matcher once and caches it.
- :class:`TokenMatcher`: one per generated sequence; ``fill_bitmask`` /
  ``apply`` mask the next token's logits, ``consume`` advances by the token that
  was sampled. Engine-neutral: a batched decoder holds one per sequence.
  :class:`LogitsMask` wraps it as a llama-cpp-python logits processor.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import grpc
import numpy as np
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

from modelplex.v1 import text_pb2
from modelplex_kit.errors import ServiceError, invalid
from modelplex_text.prompting import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, OutputConstraint, output_constraint

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConstraintLimits:
    """What a schema may ask for; beyond it, the request is a 400 (OpenAI's own limits are similar)."""

    max_schema_bytes: int = 64 * 1024  # the schema as compact JSON
    max_depth: int = 48  # JSON nesting of the schema document (a schema level is ~2 of these)
    max_length: int = 8_192  # minLength / maxLength
    max_items: int = 1_024  # minItems / maxItems / minProperties / maxProperties / min-maxContains
    max_pattern_chars: int = 1_000  # one `pattern` (or `patternProperties` key)
    max_repeat: int = 256  # n and m in a pattern's {n}, {n,} or {n,m}
    max_repeat_product: int = 1_024  # nested bounds multiply: ((a{200}){200}){200} is 8 million a's
    max_enum: int = 1_000  # values in one `enum`
    max_ref_chain: int = 16  # a $ref pointing to a $ref pointing to ...
    max_alternatives: int = 256  # anyOf / oneOf / allOf branches in the whole schema


LIMITS = ConstraintLimits()

# llguidance's own budgets, set explicitly rather than trusting defaults. Fuel is
# counted work: ~14k lexer fuel/ms and ~20k Earley items/ms, so one token mask
# is bounded to a few milliseconds of CPU, and compiling to well under a second.
PARSER_LIMITS = dict(
    max_items_in_row=2_000,
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    step_max_items=50_000,
    max_lexer_states=100_000,
    max_grammar_size=200_000,
    verbose_errors=False,  # errors go to clients: no parser state in them
)

# Compact JSON with the separators models write themselves; no free whitespace (a
# small model would fill max_tokens with newlines). Unimplemented keywords (e.g.
# uniqueItems) are not enforced instead of failing, as OpenAI-compatible servers do.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}

# Prose (which may not open with "<", so it cannot start a call), or one call in tags.
_TOOL_CALL_OR_TEXT = 'start: TEXT | "{open}" call "{close}"\nTEXT: /[^<](?s:.)*/\ncall: %json {schema}\n'

_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


class ConstraintError(ServiceError):
    """The constraint cannot be enforced: a 400 naming the parameter it came from."""

    def __init__(self, message: str, param: str) -> None:
        error = invalid(message, param)
        super().__init__(error.status, error.message, param=param)


def parser_limits() -> LLParserLimits:
    return LLParserLimits(**PARSER_LIMITS)


# -- validation ---------------------------------------------------------------


def check_request(request: text_pb2.GenerateRequest, limits: ConstraintLimits = LIMITS) -> None:
    """Raises a 400 when the request's tools or response format cannot be enforced; for every engine."""
    constraint = output_constraint(request)
    if constraint is not None:
        check_constraint(constraint, limits)


def check_constraint(constraint: OutputConstraint, limits: ConstraintLimits = LIMITS) -> str:
    """Validates ``constraint`` and returns its llguidance grammar (tokenizer-independent).

    Each tool's parameters are checked on their own first, so the error names the tool.
    """
    for index, parameters in _tool_parameters(constraint):
        _check_schema(json.dumps(parameters), limits, f"tools[{index}].function.parameters")
    schema_json = json.dumps(constraint.schema) if constraint.schema is not None else ""
    return _checked_grammar(constraint.kind, schema_json, limits, constraint.param)


def _tool_parameters(constraint: OutputConstraint) -> list[tuple[int, Any]]:
    if not constraint.tool_indexes or not isinstance(constraint.schema, dict):
        return []
    variants = constraint.schema.get("anyOf", [constraint.schema])
    return [
        (index, variant["properties"]["arguments"])
        for index, variant in zip(constraint.tool_indexes, variants, strict=True)
    ]


@lru_cache(maxsize=256)
def _check_schema(schema_json: str, limits: ConstraintLimits, param: str) -> None:
    _check_limits(json.loads(schema_json), schema_json, limits, param)
    _validate(_grammar(_schema_with_options(json.loads(schema_json), param), param), param)


@lru_cache(maxsize=256)
def _checked_grammar(kind: str, schema_json: str, limits: ConstraintLimits, param: str) -> str:
    if kind == "json_object":
        grammar = _grammar({"type": "object", "x-guidance": JSON_OPTIONS}, param)
    else:
        schema = json.loads(schema_json or "{}")
        _check_limits(schema, schema_json, limits, param)
        schema = _schema_with_options(schema, param)
        if kind == "tool_call_or_text":
            lark = _TOOL_CALL_OR_TEXT.format(open=TOOL_CALL_OPEN, close=TOOL_CALL_CLOSE, schema=json.dumps(schema))
            grammar = LLMatcher.grammar_from_lark(lark)
        elif kind in ("json_schema", "tool_call"):
            grammar = _grammar(schema, param)
        else:
            raise ValueError(f"unknown constraint kind {kind!r}")
    _validate(grammar, param)
    return grammar


def _schema_with_options(schema: Any, param: str) -> dict[str, Any]:
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError("The JSON schema must be an object.", param)
    # Our output options win over any the client sent.
    return {**_closed_objects(schema), "x-guidance": JSON_OPTIONS}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_SLOTS = (
    "additionalProperties", "items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else",
    "contains", "propertyNames", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
)  # fmt: skip


def _closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where objects that list their properties allow no others, unless they say so.

    What llama.cpp's GBNF did and OpenAI's strict mode requires: otherwise a small
    model keeps inventing keys and never closes the object.
    """
    root = copy.deepcopy(schema)
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("properties"), dict):
            node.setdefault("additionalProperties", False)
        stack += [sub for key in _SCHEMA_MAPS if isinstance(node.get(key), dict) for sub in node[key].values()]
        for key in _SCHEMA_SLOTS:
            value = node.get(key)
            stack += value if isinstance(value, list) else [value]
    return root


def _grammar(schema: dict[str, Any], param: str) -> str:
    try:
        return LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:  # e.g. numbers beyond 64 bits
        raise ConstraintError(f"This JSON schema cannot be enforced: {_first_line(str(exc))}", param) from exc


def _validate(grammar: str, param: str) -> None:
    error = LLMatcher.validate_grammar(grammar, None, limits=parser_limits())
    if error:
        raise ConstraintError(f"This JSON schema cannot be enforced: {_first_line(error)}", param)


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip().strip("^")]
    return " ".join(lines)[:300]


def _check_limits(schema: Any, schema_json: str, limits: ConstraintLimits, param: str) -> None:
    """Walks the schema (iteratively: depth is what is being checked) against ``limits``."""

    def fail(rule: str, path: str) -> None:
        where = f" (at {path})" if path else ""
        raise ConstraintError(f"The JSON schema{where} is beyond the limits for structured output: {rule}.", param)

    size = len(schema_json.encode("utf-8"))
    if size > limits.max_schema_bytes:
        fail(f"it is {size} bytes, the limit is {limits.max_schema_bytes}", "")
    alternatives = 0
    stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > limits.max_depth:
            fail(f"it is nested deeper than {limits.max_depth} levels", path)
        if isinstance(node, list):
            stack.extend((item, f"{path}/{i}", depth + 1) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for rule in _node_violations(node, schema, limits):
            fail(rule, path)
        alternatives += sum(len(node[k]) for k in ("anyOf", "oneOf", "allOf") if isinstance(node.get(k), list))
        if alternatives > limits.max_alternatives:
            fail(f"more than {limits.max_alternatives} anyOf/oneOf/allOf branches in all", path)
        for key, value in node.items():
            if key not in ("enum", "const", "default", "examples") and isinstance(value, dict | list):
                stack.append((value, f"{path}/{key}", depth + 1))


_LENGTH_KEYS = ("minLength", "maxLength")
_COUNT_KEYS = ("minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")


def _node_violations(node: dict[str, Any], root: Any, limits: ConstraintLimits) -> list[str]:
    rules = []
    for keys, limit in ((_LENGTH_KEYS, limits.max_length), (_COUNT_KEYS, limits.max_items)):
        for key in keys:
            value = node.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > limit:
                rules.append(f"`{key}` {value} is above {limit}")
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > limits.max_enum:
        rules.append(f"`enum` has {len(enum)} values, the limit is {limits.max_enum}")
    patterns = [node.get("pattern")]
    if isinstance(node.get("patternProperties"), dict):
        patterns += list(node["patternProperties"])
    rules += [rule for p in patterns if isinstance(p, str) for rule in _pattern_violations(p, limits)]
    if isinstance(node.get("$ref"), str) and _ref_chain(root, node["$ref"], limits.max_ref_chain) is None:
        rules.append(f"`$ref` chains through more than {limits.max_ref_chain} references")
    return rules


def _pattern_violations(pattern: str, limits: ConstraintLimits) -> list[str]:
    if len(pattern) > limits.max_pattern_chars:
        return [f"a `pattern` of {len(pattern)} characters, the limit is {limits.max_pattern_chars}"]
    bound, product = _repetition_bounds(pattern)
    if bound > limits.max_repeat:
        return [f"a repetition bound of {bound} in `pattern`, the limit is {limits.max_repeat}"]
    if product > limits.max_repeat_product:
        return [
            f"nested repetition bounds in `pattern` multiply to {product}, the limit is {limits.max_repeat_product}"
        ]
    return []


def _repetition_bounds(pattern: str) -> tuple[int, int]:
    """The largest n or m of a {n}, {n,} or {n,m} quantifier, and the largest product of nested ones.

    A light scan, not a parser: escapes and character classes are skipped, groups tracked
    with a stack holding the largest weight inside each open group.
    """
    largest, stack, last = 0, [1], 1  # last: the weight of the atom or group a quantifier would apply to
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i, last = i + 2, 1
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class, last = True, 1
            i += 2 if pattern[i + 1 : i + 2] == "]" else 1  # "[]...]": a leading "]" is literal
            continue
        elif char == "(":
            stack.append(1)
        elif char == ")":
            last = stack.pop() if len(stack) > 1 else 1
            stack[-1] = max(stack[-1], last)
        elif char == "{" and (match := _REPEAT.match(pattern, i)):
            bound = max(int(n) for n in match.groups() if n)
            largest, last = max(largest, bound), last * max(bound, 1)
            stack[-1] = max(stack[-1], last)
            i = match.end()
            continue
        else:
            last = 1
        i += 1
    return largest, max(stack)


def _ref_chain(root: Any, ref: str, limit: int) -> int | None:
    """Hops from ``ref`` to a schema that is not itself a bare $ref; None when over ``limit`` (or a cycle)."""
    seen = set()
    for hops in range(limit + 1):
        if ref in seen:
            return None
        seen.add(ref)
        target = _resolve(root, ref)
        if not (isinstance(target, dict) and isinstance(target.get("$ref"), str)):
            return hops
        ref = target["$ref"]
    return None


def _resolve(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return None  # remote refs: llguidance rejects them itself
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


# -- token-level enforcement ----------------------------------------------------


class ConstraintCompiler:
    """Compiles constraints for one tokenizer (one model), caching the compiled matchers."""

    def __init__(
        self, tokenizer: LLTokenizer, limits: ConstraintLimits = LIMITS, cache_size: int = 64, *, owner: Any = None
    ) -> None:
        self.tokenizer = tokenizer
        self._owner = owner  # what the tokenizer points into (a llama.cpp model), kept alive with it
        self._limits = limits
        self._compile_cached = lru_cache(maxsize=cache_size)(self._compile)

    @classmethod
    def for_llama(cls, llm: Any, **kwargs: Any) -> ConstraintCompiler:
        """For a loaded llama-cpp-python model (``vocab_only=True`` is enough); about a second."""
        return cls(llama_tokenizer(llm), owner=llm, **kwargs)

    def compile(self, constraint: OutputConstraint) -> CompiledConstraint:
        """Validates and compiles ``constraint``; raises a 400 :class:`ConstraintError` when it cannot be enforced."""
        check_constraint(constraint, self._limits)
        schema_json = json.dumps(constraint.schema) if constraint.schema is not None else ""
        return self._compile_cached(constraint.kind, schema_json, constraint.param)

    def _compile(self, kind: str, schema_json: str, param: str) -> CompiledConstraint:
        grammar = _checked_grammar(kind, schema_json, self._limits, param)
        started = time.perf_counter()
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise ConstraintError(f"This JSON schema cannot be enforced: {_first_line(matcher.get_error())}", param)
        log.debug("constraint compiled", extra={"kind": kind, "ms": round((time.perf_counter() - started) * 1e3, 1)})
        return CompiledConstraint(matcher, self.tokenizer.vocab_size, tuple(self.tokenizer.eos_tokens), param)


class CompiledConstraint:
    """A compiled constraint; cheap to start sequences from (one :class:`TokenMatcher` each)."""

    def __init__(self, template: LLMatcher, vocab_size: int, eos_tokens: tuple[int, ...], param: str) -> None:
        self._template = template
        self.vocab_size = vocab_size
        self.eos_tokens = eos_tokens
        self.param = param

    def matcher(self) -> TokenMatcher:
        return TokenMatcher(self._template.deep_copy(), self.vocab_size, self.eos_tokens, self.param)


class TokenMatcher:
    """Where one sequence stands in its constraint.

    Per step: ``apply(logits)`` (or ``fill_bitmask``) before sampling, then
    ``consume(token)`` with the token sampled. EOS is only allowed while the
    output so far is complete. A step that runs out of fuel puts the matcher in
    an error state: the next call raises a 400 :class:`ConstraintError`.
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos_tokens: tuple[int, ...], param: str) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.eos_tokens = eos_tokens
        self.param = param
        self.tokens = 0
        self.mask_seconds: list[float] = []  # per mask, for benchmarks and logs

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Writes the allowed-token bitmask (int32, ``(vocab_size + 31) // 32`` words, bit i = token i)."""
        started = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        self.mask_seconds.append(time.perf_counter() - started)
        self._raise_if_error()

    def allowed(self) -> np.ndarray:
        """The next token's allowed set as a bool array over the vocabulary."""
        words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        self.fill_bitmask(words)
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Sets disallowed tokens' logits to -inf, in place (also beyond the tokenizer's vocabulary)."""
        allowed = self.allowed()
        n = min(len(logits), self.vocab_size)
        logits[:n][~allowed[:n]] = -np.inf
        logits[n:] = -np.inf
        return logits

    def consume(self, token: int) -> None:
        self._matcher.consume_token(int(token))
        self.tokens += 1
        self._raise_if_error()

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    def is_stopped(self) -> bool:
        return self._matcher.is_stopped()

    def close(self) -> None:
        """Nothing native to free early: the matcher goes with its last reference."""

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            reason = _first_line(self._matcher.get_error())
            log.warning("constrained decoding stopped", extra={"reason": reason, "tokens": self.tokens})
            raise ConstraintError(
                f"This JSON schema is too complex to enforce (stopped after {self.tokens} tokens): {reason}", self.param
            )


class LogitsMask:
    """A llama-cpp-python logits processor enforcing one sequence's :class:`TokenMatcher`.

    llama-cpp-python calls processors before sampling and never reports the
    sampled token to them, but each call's ``input_ids`` ends with every token
    evaluated so far: the tokens beyond those seen last time are the sampled
    ones, consumed before masking the next step. (The last sampled token is
    never consumed: it is EOS, or generation stopped.)

    Processors run inside a ctypes callback, where an exception would be
    swallowed: a failure is kept, only EOS is allowed, and :meth:`stop_on_error`
    (a stopping criterion, called from Python right after sampling) raises it.
    """

    def __init__(self, matcher: TokenMatcher) -> None:
        self.matcher = matcher
        self.error: ServiceError | None = None
        self._seen: int | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.error is None:
            try:
                if self._seen is not None:
                    for token in input_ids[self._seen :]:
                        self.matcher.consume(int(token))
                self._seen = len(input_ids)
                return self.matcher.apply(scores)
            except ServiceError as exc:
                self.error = exc
            except Exception:  # a bug, not the client's: a 500 without details
                log.exception("constrained decoding failed")
                self.error = ServiceError(grpc.StatusCode.INTERNAL, "Constrained decoding failed.")
        scores[:] = -np.inf
        scores[[t for t in self.matcher.eos_tokens if t < len(scores)]] = 0.0
        return scores

    def stop_on_error(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        if self.error is not None:
            raise self.error
        return False


def llama_tokenizer(llm: Any) -> LLTokenizer:
    """llguidance's view of a loaded llama-cpp-python model's vocabulary.

    The tokenizer calls into ``llm``'s vocabulary: ``llm`` must outlive it (see
    :meth:`ConstraintCompiler.for_llama`, which keeps it).
    """
    import llama_cpp
    from llguidance.llamacpp import lltokenizer_from_vocab

    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    # Every end-of-generation token (ChatML models end turns with <|im_end|>) ends a constrained output.
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)] or None
    with warnings.catch_warnings():  # llguidance's helper calls a deprecated alias once per token
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab, eos_token=eog)
