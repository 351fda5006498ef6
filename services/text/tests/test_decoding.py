import numpy as np
import pytest

from modelplex.v1 import text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.choices import completion_budget
from modelplex_text.decoding import StopText, TokenSampler
from modelplex_text.sampling import SamplingParams


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_a_real_one():
    stop = StopText(["END"])
    assert stop.feed(b"Hello E") == ("Hello ", False)  # "E" may start "END"
    assert stop.feed(b"N") == ("", False)
    assert stop.feed(b"D and more") == ("", True)  # the stop string and what follows are never emitted


def test_stop_text_releases_a_false_alarm_and_joins_split_utf8():
    stop = StopText(["END"])
    assert stop.feed(b"E") == ("", False)
    assert stop.feed(b"xit \xc3") == ("Exit ", False)  # half a character waits for its other byte
    assert stop.feed(b"\xa9") == ("é", False)
    assert stop.feed(b"E") == ("", False)
    assert stop.flush() == "E"


def test_greedy_sampling_takes_the_best_allowed_token():
    logits = np.array([1.0, 5.0, 3.0], dtype=np.float32)
    assert TokenSampler(SamplingParams(temperature=0.0, top_p=1.0)).sample(logits.copy()) == 1
    masked = logits.copy()
    masked[1] = -np.inf  # what a TokenMatcher does to a disallowed token
    assert TokenSampler(SamplingParams(temperature=1.0, top_p=1.0, seed=1)).sample(masked) in (0, 2)


def test_seeded_sampling_repeats_and_top_p_cuts_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    draws = [TokenSampler(SamplingParams(1.0, 1.0, seed=7)).sample(logits.copy()) for _ in range(3)]
    assert len(set(draws)) == 1
    nucleus = TokenSampler(SamplingParams(1.0, 0.6, seed=3))
    assert {nucleus.sample(logits.copy()) for _ in range(200)} == {0, 1}


def test_penalties_apply_to_the_sequences_own_tokens():
    sampler = TokenSampler(SamplingParams(0.0, 1.0, presence_penalty=2.0, frequency_penalty=1.0))
    sampler.accept(0)
    assert sampler.sample(np.array([3.0, 1.5], dtype=np.float32)) == 1  # 3 - 2 - 1 = 0 < 1.5


def test_completion_budget_is_what_the_context_leaves():
    request = text_pb2.GenerateRequest()
    assert completion_budget(request, 100, 512) == 412
    request.sampling.max_tokens = 412
    assert completion_budget(request, 100, 512) == 412
    request.sampling.max_tokens = 413
    with pytest.raises(ServiceError) as caught:
        completion_budget(request, 100, 512)
    assert caught.value.param == "max_tokens" and "(413 > 512 - 100)" in caught.value.message


def test_the_default_output_limit_caps_and_never_refuses():
    request = text_pb2.GenerateRequest()
    request.sampling.default_max_tokens = 64
    assert completion_budget(request, 100, 512) == 64
    assert completion_budget(request, 480, 512) == 32  # less room than the default: what is left
    request.sampling.max_tokens = 300  # the client's own bound wins
    assert completion_budget(request, 100, 512) == 300
