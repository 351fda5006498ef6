import json

from modelplex.v1 import text_pb2
from modelplex_text.constraints import check_constraint
from modelplex_text.prompting import CHATML_TEMPLATE, ChatTemplate, chat_messages, plan_prompt


def chat(*turns, **fields) -> text_pb2.GenerateRequest:
    messages = [text_pb2.ChatMessage(role=r, content=[text_pb2.ContentPart(text=t)]) for r, t in turns]
    return text_pb2.GenerateRequest(chat=text_pb2.ChatInput(messages=messages), **fields)


TOOL = text_pb2.Tool(
    name="lookup",
    parameters_json=json.dumps({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}),
)


def test_tool_instructions_join_the_existing_system_turn():
    request = chat(("system", "Be brief."), ("user", "hi"), tools=[TOOL])
    messages = chat_messages(request)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Be brief.") and '"name": "lookup"' in messages[0]["content"]


def test_developer_role_is_a_system_turn_for_templates_without_it():
    assert chat_messages(chat(("developer", "x"), ("user", "y")))[0]["role"] == "system"


def test_tool_choice_none_hides_the_tools():
    template = ChatTemplate(CHATML_TEMPLATE)
    request = chat(("user", "hi"), tools=[TOOL], tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_NONE))
    assert "lookup" not in plan_prompt(request, template).prompt
    assert "lookup" in plan_prompt(chat(("user", "hi"), tools=[TOOL]), template).prompt


def test_earlier_tool_calls_and_their_results_reach_the_prompt():
    request = chat(("user", "Weather in Paris?"), tools=[TOOL])
    request.chat.messages.add(
        role="assistant", tool_calls=[text_pb2.ToolCall(id="call_1", name="lookup", arguments='{"q": "Paris"}')]
    )
    request.chat.messages.add(
        role="tool", tool_call_id="call_1", content=[text_pb2.ContentPart(text='{"temperature": 21}')]
    )
    prompt = plan_prompt(request, ChatTemplate(CHATML_TEMPLATE)).prompt
    assert '<tool_call>{"name": "lookup", "arguments": {"q": "Paris"}}</tool_call>' in prompt
    assert '<|im_start|>tool\n{"temperature": 21}<|im_end|>' in prompt


def test_constraints_follow_tool_choice_and_response_format():
    template = ChatTemplate(CHATML_TEMPLATE)
    required = chat(
        ("user", "hi"), tools=[TOOL], tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_REQUIRED)
    )
    auto = chat(("user", "hi"), tools=[TOOL])
    schema = chat(
        ("user", "hi"),
        response_format=text_pb2.ResponseFormat(
            type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
            schema_json='{"type": "object", "properties": {"b": {}, "a": {}}}',
        ),
    )
    assert plan_prompt(required, template).constraint.kind == "tool_call"
    assert plan_prompt(auto, template).constraint.kind == "tool_call_or_text"
    plan = plan_prompt(schema, template)
    assert list(plan.constraint.schema["properties"]) == ["b", "a"]  # key order survives the wire


def test_every_constraint_compiles_to_a_grammar():
    template = ChatTemplate(CHATML_TEMPLATE)
    for request in (
        chat(("user", "x"), tools=[TOOL]),
        chat(("user", "x"), tools=[TOOL], tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_REQUIRED)),
        chat(("user", "x"), response_format=text_pb2.ResponseFormat(type=text_pb2.ResponseFormat.TYPE_JSON_OBJECT)),
    ):
        assert check_constraint(plan_prompt(request, template).constraint)


def test_chatml_rendering():
    text = ChatTemplate(CHATML_TEMPLATE).render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
