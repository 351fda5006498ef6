"""Wire models and translators: OpenAI JSON in, protobuf out, OpenAI JSON back."""

import json

import pytest

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2
from modelplex_edge.endpoints.chat import translate as chat_tr
from modelplex_edge.endpoints.chat.protocol import ChatCompletionRequest
from modelplex_edge.errors import openai_param, parse_body
from modelplex_kit.errors import ServiceError

META = common_pb2.RequestMeta(request_id="r1")


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("messages", 0, "content"), "messages[0].content"),
        (
            ("messages", 1, "content", "list[tagged-union[TextPart,ImagePart]]", 0, "ImagePart", "image_url"),
            "messages[1].content[0].image_url",
        ),
        (("temperature",), "temperature"),
        (("stop", "str"), "stop"),
    ],
)
def test_openai_param_notation(loc, param):
    assert openai_param(loc) == param


def test_assistant_messages_echoed_from_responses_are_accepted():
    # SDK users append response messages (with refusal/annotations/audio) back into the conversation.
    echoed = {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "audio": None}
    parsed = parse_body(ChatCompletionRequest, body(messages=[{"role": "user", "content": "x"}, echoed]))
    assert parsed.messages[1].content == "hi"


def test_unknown_top_level_fields_are_rejected_like_openai():
    with pytest.raises(ServiceError) as err:
        parse_body(ChatCompletionRequest, body(temprature=1))
    assert err.value.param == "temprature" and "Unrecognized" in err.value.message


def test_named_tool_choice_must_name_a_given_tool():
    tools = [{"type": "function", "function": {"name": "a"}}]
    with pytest.raises(ServiceError) as err:
        parse_body(
            ChatCompletionRequest, body(tools=tools, tool_choice={"type": "function", "function": {"name": "b"}})
        )
    assert err.value.param == "tool_choice"


def test_to_proto_carries_every_field():
    request = parse_body(
        ChatCompletionRequest,
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:,x"}},
                    ],
                }
            ],
            temperature=0.5,
            top_p=0.8,
            presence_penalty=0.25,
            frequency_penalty=-0.5,
            max_tokens=50,
            max_completion_tokens=9,
            stop="END",
            seed=3,
            n=2,
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": {"z": {}, "a": {}}}},
                }
            ],
            tool_choice={"type": "function", "function": {"name": "f"}},
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        ),
    )
    proto = chat_tr.to_proto(request, catalog_pb2.Model(id="canonical"), META)
    assert proto.meta.request_id == "r1"
    assert proto.model == "canonical" and proto.n == 2
    assert proto.chat.messages[0].content[1].image.url == "data:,x"
    assert abs(proto.sampling.temperature - 0.5) < 1e-6 and proto.sampling.max_tokens == 9  # the newer name wins
    assert abs(proto.sampling.top_p - 0.8) < 1e-6
    assert (proto.sampling.presence_penalty, proto.sampling.frequency_penalty) == (0.25, -0.5)
    assert list(proto.sampling.stop) == ["END"] and proto.sampling.seed == 3
    assert list(json.loads(proto.tools[0].parameters_json)["properties"]) == ["z", "a"]
    assert proto.tool_choice.mode == text_pb2.ToolChoice.MODE_NAMED and proto.tool_choice.function_name == "f"
    assert proto.response_format.type == text_pb2.ResponseFormat.TYPE_JSON_SCHEMA


def test_from_proto_builds_openais_shape():
    response = text_pb2.GenerateResponse(
        id="abc",
        created=1,
        choices=[
            text_pb2.Choice(
                index=0,
                tool_calls=[text_pb2.ToolCall(id="call_1", name="f", arguments="{}")],
                finish_reason=text_pb2.FINISH_REASON_TOOL_CALLS,
            )
        ],
        usage=common_pb2.Usage(
            prompt_tokens=5, completion_tokens=2, total_tokens=7, cached_prompt_tokens=3, cache_creation_prompt_tokens=2
        ),
    )
    out = chat_tr.from_proto(response, "m")
    assert out["id"] == "chatcmpl-abc" and out["object"] == "chat.completion"
    message = out["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert out["usage"]["cache_creation_input_tokens"] == 2


def test_admission_reserves_the_output_bound_or_the_rest_of_the_context():
    body = parse_body(
        ChatCompletionRequest, json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    )
    model = catalog_pb2.Model(id="m", context_length=8192)
    unbounded = chat_tr.cost(body, model)
    assert 8000 < unbounded <= 8192 + 10  # prompt estimate + what the engine may still generate
    bounded = body.model_copy(update={"max_tokens": 100, "n": 2})
    assert chat_tr.cost(bounded, model) < 250


def test_the_session_a_request_names_reaches_the_backend_for_replica_affinity():
    from modelplex_edge.endpoints.completions import translate as completions_tr
    from modelplex_edge.endpoints.completions.protocol import CompletionRequest
    from modelplex_edge.endpoints.responses import translate as responses_tr
    from modelplex_edge.endpoints.responses.protocol import CreateResponseRequest

    keyed = parse_body(ChatCompletionRequest, body(prompt_cache_key="tenant-7", user="u1"))
    proto = chat_tr.to_proto(keyed, catalog_pb2.Model(id="m"), META)
    assert (proto.prompt_cache_key, proto.user) == ("tenant-7", "u1")
    safety = parse_body(ChatCompletionRequest, body(safety_identifier="hashed-u2"))
    assert chat_tr.to_proto(safety, catalog_pb2.Model(id="m"), META).user == "hashed-u2"

    legacy = parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": ["a", "b"], "user": "u3"}).encode())
    assert [p.user for p in completions_tr.to_protos(legacy, "m", META)] == ["u3", "u3"]

    responses = parse_body(
        CreateResponseRequest, json.dumps({"model": "m", "input": "hi", "prompt_cache_key": "k", "user": "u4"}).encode()
    )
    proto = responses_tr.to_proto(responses, responses.items, "m", META)
    assert (proto.prompt_cache_key, proto.user) == ("k", "u4")
