"""Transcriptions: the form -> TranscribeRequest; TranscribeResponse -> json, text, srt, vtt or verbose_json."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import PlainTextResponse, Response

from modelplex.v1 import common_pb2, transcription_pb2
from modelplex_edge.admission import Consumption
from modelplex_edge.responses import json_response


def to_proto(
    form: Any, audio: bytes, filename: str, model_id: str, meta: common_pb2.RequestMeta, translate: bool = False
) -> transcription_pb2.TranscribeRequest:
    granularities = getattr(form, "timestamp_granularities", [])
    return transcription_pb2.TranscribeRequest(
        meta=meta,
        model=model_id,
        audio=audio,
        filename=filename,
        language=getattr(form, "language", None) or "",
        prompt=form.prompt or "",
        temperature=form.temperature,
        segment_timestamps=form.response_format == "verbose_json",
        word_timestamps="word" in granularities,
        translate=translate,
    )


def meter(message: Any, used: Consumption) -> None:
    """Transcription is metered in seconds of audio (on the unary response and the stream's last message;
    before it, the seconds recognised so far, accounted if the stream ends early)."""
    streamed = isinstance(message, transcription_pb2.TranscribeStreamResponse)
    done = message.done if streamed else message
    if done.duration_seconds:
        used.add_units(done.duration_seconds, "seconds")
    elif streamed and message.seconds_so_far:
        used.running_count(message.seconds_so_far, "seconds")


def _usage(response: transcription_pb2.TranscribeResponse) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(response.duration_seconds, 3)}


def _segment(segment: transcription_pb2.TranscriptSegment, temperature: float) -> dict[str, Any]:
    return {
        "id": segment.id,
        "seek": segment.seek,
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text,
        "tokens": list(segment.tokens),
        "temperature": temperature,
        "avg_logprob": segment.avg_logprob,
        "compression_ratio": segment.compression_ratio,
        "no_speech_prob": segment.no_speech_prob,
    }


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _captions(response: transcription_pb2.TranscribeResponse, vtt: bool) -> str:
    separator = "." if vtt else ","
    cues = []
    for number, segment in enumerate(response.segments, start=1):
        span = f"{_timestamp(segment.start, separator)} --> {_timestamp(segment.end, separator)}"
        cues.append(f"{span}\n{segment.text.strip()}\n" if vtt else f"{number}\n{span}\n{segment.text.strip()}\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


def render(
    response: transcription_pb2.TranscribeResponse,
    response_format: str,
    *,
    task: str,
    temperature: float,
    words: bool,
    headers: dict[str, str],
) -> Response:
    if response_format == "text":
        return PlainTextResponse(response.text + "\n", headers=headers)
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(_captions(response, response_format == "vtt"), headers=headers)
    if response_format == "json":
        return json_response({"text": response.text, "usage": _usage(response)}, headers=headers or None)
    body: dict[str, Any] = {
        "task": task,
        "language": response.language,
        "duration": round(response.duration_seconds, 3),
        "text": response.text,
        "segments": [_segment(s, temperature) for s in response.segments],
        "usage": _usage(response),
    }
    if words:
        body["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in response.words]
    return json_response(body, headers=headers or None)


async def stream_events(stream: AsyncIterator[transcription_pb2.TranscribeStreamResponse]) -> AsyncIterator[dict]:
    """OpenAI's transcript.text.delta events, then transcript.text.done with the text and usage.

    Usage is seconds of audio (OpenAI's duration usage): a model billed by the second has no tokens to report."""
    async for message in stream:
        if message.HasField("done"):
            yield {"type": "transcript.text.done", "text": message.done.text, "usage": _usage(message.done)}
        elif message.delta:
            yield {"type": "transcript.text.delta", "delta": message.delta}
