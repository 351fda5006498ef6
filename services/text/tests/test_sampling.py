from modelplex.v1 import text_pb2
from modelplex_text.sampling import sampling_kwargs


def test_unset_values_take_the_models_defaults_and_set_ones_win():
    unset = sampling_kwargs(text_pb2.GenerateRequest(), default_temperature=0.2, default_top_p=0.9)
    assert (unset["temperature"], unset["top_p"], unset["max_tokens"]) == (0.2, 0.9, None)
    request = text_pb2.GenerateRequest(sampling=text_pb2.SamplingParams(temperature=0.0, top_p=0.5, max_tokens=7))
    chosen = sampling_kwargs(request, default_temperature=0.2, default_top_p=0.9)
    assert (chosen["temperature"], chosen["top_p"], chosen["max_tokens"]) == (0.0, 0.5, 7)


def test_openais_defaults_without_model_defaults():
    assert sampling_kwargs(text_pb2.GenerateRequest())["temperature"] == 1.0
