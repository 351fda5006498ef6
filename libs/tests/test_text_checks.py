import pytest

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_kit.modalities.text import check_and_fit_text_request

ALL = catalog_pb2.Capabilities(
    text=catalog_pb2.TextCapabilities(
        chat=True, completions=True, tool_use=True, vision=True, json_schema=True, logprobs=True, multiple_choices=True
    )
)
CHAT_ONLY = catalog_pb2.Capabilities(text=catalog_pb2.TextCapabilities(chat=True))


def chat(**fields) -> text_pb2.GenerateRequest:
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text="hi")])
    return text_pb2.GenerateRequest(chat=text_pb2.ChatInput(messages=[message]), **fields)


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat(n=2), "n"),
        (chat(logprobs=True), "logprobs"),
        (chat(tools=[text_pb2.Tool(name="f")]), "tools"),
        (text_pb2.GenerateRequest(completion=text_pb2.CompletionInput(prompt="x")), "model"),
    ],
)
def test_refusals_name_the_parameter(request_, param):
    check_and_fit_text_request(request_, ALL)
    with pytest.raises(ServiceError) as err:
        check_and_fit_text_request(request_, CHAT_ONLY)
    assert err.value.param == param and err.value.http.status == 400


def test_images_need_vision():
    request = chat()
    request.chat.messages[0].content.add(image=text_pb2.ImageInput(url="data:image/png;base64,AA=="))
    with pytest.raises(ServiceError) as err:
        check_and_fit_text_request(request, CHAT_ONLY)
    assert err.value.param == "messages[0].content[1]"


def test_json_schema_falls_back_to_json_object():
    request = chat(
        response_format=text_pb2.ResponseFormat(
            type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema_json='{"type": "object"}'
        )
    )
    check_and_fit_text_request(request, CHAT_ONLY)
    assert request.response_format.type == text_pb2.ResponseFormat.TYPE_JSON_OBJECT
    assert request.response_format.schema_json == ""


def test_more_than_twenty_alternatives_per_token_is_a_400_naming_top_logprobs():
    check_and_fit_text_request(chat(logprobs=True, top_logprobs=20), ALL)
    with pytest.raises(ServiceError) as err:
        check_and_fit_text_request(chat(logprobs=True, top_logprobs=21), ALL)
    assert err.value.param == "top_logprobs" and err.value.http.status == 400
