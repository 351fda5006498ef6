"""Translations: English text out of any speech, by the model itself or by the catalog's translation_model.

The edge, not the transcription backend, calls the text model: the edge already
knows every model's backend from the catalog, admits and meters the request once,
and so no backend needs to know another one (backends stay leaves of the graph).
"""

from __future__ import annotations

from modelplex.v1 import text_pb2

# What a transcript counts as English in (engines report a name or an ISO-639-1 code).
ENGLISH = {"en", "english", "en-us", "en-gb"}
_INSTRUCTION = (
    "Translate the user's text into English. Reply with the English translation only, "
    "without quotes, notes or explanations."
)


def needs_translation(language: str) -> bool:
    return language.lower() not in ENGLISH


def chat_request(transcript: str) -> text_pb2.GenerateRequest:
    messages = [
        text_pb2.ChatMessage(role="system", content=[text_pb2.ContentPart(text=_INSTRUCTION)]),
        text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=transcript)]),
    ]
    # Room for the translation: English runs at most about twice the source's tokens.
    sampling = text_pb2.SamplingParams(max_tokens=64 + 2 * len(transcript.split()), temperature=0.0)
    return text_pb2.GenerateRequest(chat=text_pb2.ChatInput(messages=messages), sampling=sampling)
