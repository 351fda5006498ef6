"""The local engine and the servicer around it, on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import numpy as np
import pytest

from modelplex.v1 import embeddings_pb2 as pb
from modelplex_embeddings.adapters import ENGINES, engine_settings, load_engine
from modelplex_embeddings.adapters.local import LocalEngine
from modelplex_embeddings.servicer import EmbeddingsServicer, resize
from modelplex_embeddings.settings import BatchingSettings, EmbeddingsSettings, LocalSettings
from modelplex_kit.errors import ServiceError

# A loaded model: kept out of `make test-fast`.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine(LocalSettings())


def texts(*values: str) -> list[pb.EmbedInput]:
    return [pb.EmbedInput(text=v) for v in values]


async def test_similarities_match_sentence_transformers_published_example(engine):
    # sentence-transformers' quickstart (sbert.net, README) with all-MiniLM-L6-v2 prints
    # tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]]).
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    vectors = await engine.embed(engine.prepare(texts(*sentences)))
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]
    np.testing.assert_allclose(vectors @ vectors.T, expected, atol=6e-5)


async def test_a_vector_does_not_depend_on_its_batch_mates(engine):
    short, long = "hello", "a much longer sentence that forces the short one to be padded in a batch"
    alone = await engine.embed(engine.prepare(texts(short)))
    together = await engine.embed(engine.prepare(texts(long, short)))
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)


def test_token_counts_include_cls_and_sep_and_token_ids_pass_through(engine):
    text, ids = engine.prepare([pb.EmbedInput(text="Hello world"), pb.EmbedInput(tokens=pb.TokenIds(ids=[7592]))])
    assert text.ids == [101, 7592, 2088, 102] and text.tokens == 4
    assert ids.ids == [7592] and ids.text is None


def test_an_input_over_256_tokens_is_refused_naming_its_index_never_truncated(engine):
    fits = "word " * 254  # 254 tokens + [CLS] + [SEP] = 256
    engine.prepare(texts(fits))
    with pytest.raises(ServiceError) as refused:
        engine.prepare(texts("ok", fits + "word"))
    assert refused.value.param == "input[1]" and refused.value.code == "context_length_exceeded"
    assert "257 tokens" in refused.value.message


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(ServiceError) as refused:
        engine.prepare([pb.EmbedInput(tokens=pb.TokenIds(ids=[101, 30522]))])
    assert refused.value.param == "input[0]"


async def test_servicer_answers_in_order_with_exact_usage(engine):
    servicer = EmbeddingsServicer(engine, BatchingSettings())
    request = pb.EmbedRequest(model="m", inputs=texts("one", "two words", "three more words"))
    response = await servicer.Embed(request, None)
    assert [e.index for e in response.embeddings] == [0, 1, 2]
    assert response.usage.prompt_tokens == 3 + 4 + 5 == response.usage.total_tokens
    alone = await servicer.Embed(pb.EmbedRequest(model="m", inputs=texts("two words")), None)
    np.testing.assert_allclose(response.embeddings[1].values, alone.embeddings[0].values, atol=1e-5)


async def test_servicer_refuses_dimensions_for_a_non_matryoshka_model(engine):
    servicer = EmbeddingsServicer(engine, BatchingSettings())
    with pytest.raises(ServiceError) as refused:
        await servicer.Embed(pb.EmbedRequest(model="m", inputs=texts("x"), dimensions=128), None)
    assert refused.value.param == "dimensions"
    ok = await servicer.Embed(pb.EmbedRequest(model="m", inputs=texts("x"), dimensions=384), None)
    assert len(ok.embeddings[0].values) == 384


def test_resize_truncates_and_renormalises():
    rows = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(resize(rows, 2), [[0.6, 0.8]])
    assert resize(rows, 0) is rows


def test_unknown_engine_is_a_clear_startup_error():
    with pytest.raises(SystemExit, match="choose one of: local, openai, triton"):
        engine_settings(EmbeddingsSettings(engine="torch"))
    assert set(ENGINES) == {"local", "openai", "triton"}


def test_registry_builds_the_engine_with_its_own_settings(monkeypatch):
    monkeypatch.setenv("MODELPLEX_EMBEDDINGS_FORWARD_BATCH", "8")
    built = load_engine(EmbeddingsSettings())
    assert isinstance(built, LocalEngine) and built._forward_batch == 8
