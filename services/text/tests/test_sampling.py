from modelplex.v1 import text_pb2
from modelplex_text.sampling import SamplingParams


def test_unset_values_take_the_models_defaults_and_set_ones_win():
    unset = SamplingParams.from_request(text_pb2.GenerateRequest(), default_temperature=0.2, default_top_p=0.9)
    assert (unset.temperature, unset.top_p, unset.max_tokens) == (0.2, 0.9, None)
    request = text_pb2.GenerateRequest(sampling=text_pb2.SamplingParams(temperature=0.0, top_p=0.5, max_tokens=7))
    chosen = SamplingParams.from_request(request, default_temperature=0.2, default_top_p=0.9)
    assert (chosen.temperature, chosen.top_p, chosen.max_tokens) == (0.0, 0.5, 7)


def test_openais_defaults_without_model_defaults():
    assert SamplingParams.from_request(text_pb2.GenerateRequest()).temperature == 1.0


def test_stop_and_penalties_are_carried_and_the_seed_is_left_to_each_choice():
    sampling = text_pb2.SamplingParams(stop=["\n", "END"], presence_penalty=0.5, frequency_penalty=0.25, seed=3)
    params = SamplingParams.from_request(text_pb2.GenerateRequest(sampling=sampling))
    assert (params.stop, params.presence_penalty, params.frequency_penalty) == (("\n", "END"), 0.5, 0.25)
    assert params.seed is None


def test_logprobs_are_the_alternatives_wanted_or_none():
    assert SamplingParams.from_request(text_pb2.GenerateRequest(top_logprobs=3)).logprobs is None
    assert SamplingParams.from_request(text_pb2.GenerateRequest(logprobs=True)).logprobs == 0
    assert SamplingParams.from_request(text_pb2.GenerateRequest(logprobs=True, top_logprobs=3)).logprobs == 3
