"""What a request is accounted when its backend stream ends early, and when it ends whole."""

from __future__ import annotations

from modelplex.v1 import common_pb2, speech_pb2, text_pb2, transcription_pb2
from modelplex_edge.admission import Consumption
from modelplex_edge.endpoints.speech.translate import meter as speech_meter
from modelplex_edge.endpoints.transcriptions.translate import meter as transcription_meter
from modelplex_edge.pipeline import meter_usage


def usage(prompt: int, completion: int) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def text_message(progress: common_pb2.Usage, final: common_pb2.Usage | None = None):
    message = text_pb2.GenerateStreamResponse(deltas=[text_pb2.ChoiceDelta(text="x")], progress=progress)
    if final is not None:
        message.usage.CopyFrom(final)
    return message


def test_a_stream_cut_before_its_final_usage_is_accounted_its_running_totals():
    used = Consumption()
    for completion in (1, 2, 150):
        meter_usage(text_message(usage(40, completion)), used)
    used.settle()
    assert (used.usage.prompt_tokens, used.usage.completion_tokens, used.usage.total_tokens) == (40, 150, 190)


def test_a_whole_stream_is_accounted_its_final_usage_once():
    used = Consumption()
    meter_usage(text_message(usage(40, 9)), used)
    meter_usage(text_message(usage(40, 10), final=usage(40, 10)), used)
    used.settle()
    assert (used.usage.prompt_tokens, used.usage.completion_tokens, used.usage.total_tokens) == (40, 10, 50)


def test_several_streams_of_one_request_add_up_whole_and_cut():
    used = Consumption()  # a multi-prompt completion: the first prompt's stream finished, the second was cut
    meter_usage(text_message(usage(5, 7), final=usage(5, 7)), used)
    meter_usage(text_message(usage(6, 3)), used)
    used.settle()
    assert (used.usage.prompt_tokens, used.usage.completion_tokens, used.usage.total_tokens) == (11, 10, 21)


def test_a_unary_response_without_running_totals_is_metered_as_before():
    used = Consumption()
    meter_usage(text_pb2.GenerateResponse(usage=usage(3, 4)), used)
    used.settle()
    assert used.usage.total_tokens == 7


def test_speech_cut_early_is_accounted_the_characters_begun():
    used = Consumption()
    speech_meter(speech_pb2.SynthesizeResponse(audio=b"a", characters_so_far=20), used)
    speech_meter(speech_pb2.SynthesizeResponse(audio=b"a", characters_so_far=45), used)
    used.settle()
    assert (used.units, used.unit_kind) == (45, "characters")
    whole = Consumption()
    speech_meter(speech_pb2.SynthesizeResponse(audio=b"a", characters_so_far=45), whole)
    speech_meter(speech_pb2.SynthesizeResponse(characters=60, characters_so_far=60), whole)
    whole.settle()
    assert whole.units == 60


def test_a_transcription_stream_cut_early_is_accounted_the_seconds_recognised():
    used = Consumption()
    transcription_meter(transcription_pb2.TranscribeStreamResponse(delta="hello", seconds_so_far=3.5), used)
    transcription_meter(transcription_pb2.TranscribeStreamResponse(delta="world", seconds_so_far=7.25), used)
    used.settle()
    assert (used.units, used.unit_kind) == (7.25, "seconds")
    whole = Consumption()
    transcription_meter(transcription_pb2.TranscribeStreamResponse(delta="hello", seconds_so_far=3.5), whole)
    done = transcription_pb2.TranscribeResponse(text="hello", duration_seconds=9.0)
    transcription_meter(transcription_pb2.TranscribeStreamResponse(done=done), whole)
    whole.settle()
    assert whole.units == 9.0
