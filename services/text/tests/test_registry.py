import pytest

from modelplex_text.adapters import ENGINES, engine_entry, load_engine
from modelplex_text.settings import LlamaCppSettings, OpenAISettings, TextSettings, TritonSettings


def test_each_engine_has_its_own_settings_model_from_the_same_variables(monkeypatch):
    assert {name: entry.settings for name, entry in ENGINES.items()} == {
        "llamacpp": LlamaCppSettings,
        "openai": OpenAISettings,
        "triton": TritonSettings,
    }
    monkeypatch.setenv("MODELPLEX_TEXT_CONTEXT_LENGTH", "2048")
    monkeypatch.setenv("MODELPLEX_TEXT_PARALLEL", "3")
    assert LlamaCppSettings().context_length == 2048 and LlamaCppSettings().parallel == 3
    assert OpenAISettings().context_length == 2048 and not hasattr(OpenAISettings(), "parallel")
    assert not hasattr(TritonSettings(), "upstream_max_connections")  # a pool it would not use


def test_an_unknown_engine_is_a_clear_startup_error():
    with pytest.raises(SystemExit, match="'tensorrt' is not an engine; choose one of: llamacpp, openai, triton"):
        engine_entry("tensorrt")
    with pytest.raises(SystemExit):
        load_engine(TextSettings(engine="tensorrt"))


def test_an_engine_missing_its_upstream_says_which_variable():
    with pytest.raises(ValueError, match="MODELPLEX_TEXT_UPSTREAM_URL"):
        load_engine(OpenAISettings(engine="openai"))


def test_the_openai_engine_reads_its_pool_from_the_text_variables(monkeypatch):
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_URL", "http://vllm-0:8000/v1,http://vllm-1:8000/v1")
    monkeypatch.setenv("MODELPLEX_TEXT_POOL_POLICY", "least_loaded")
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_DISCOVERY", "dns")
    monkeypatch.setenv("MODELPLEX_TEXT_CONTEXT_LENGTH", "2048")
    settings = OpenAISettings()
    assert settings.upstream_url.count(",") == 1 and settings.context_length == 2048
    assert (settings.pool_policy, settings.upstream_discovery) == ("least_loaded", "dns")
