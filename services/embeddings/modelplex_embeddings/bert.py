"""A BERT encoder forward pass in numpy, with sentence-transformers' mean pooling and L2 norm.

all-MiniLM-L6-v2 is small (6 layers, 384 wide): float32 numpy matmuls over
OpenBLAS serve it on CPU at a few ms per sentence, with no torch (whose package-index
build pulls gigabytes of CUDA libraries) and no ONNX export step. The maths follows
Hugging Face's ``BertModel`` (post-layer-norm, exact erf GELU, padding masked out
of attention) so the vectors match sentence-transformers' to float32 precision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv: np.ndarray  # [hidden, 3 * hidden]: query, key and value projections in one matmul
    qkv_bias: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray
    ln1: tuple[np.ndarray, np.ndarray]
    up: np.ndarray
    up_bias: np.ndarray
    down: np.ndarray
    down_bias: np.ndarray
    ln2: tuple[np.ndarray, np.ndarray]


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32's resolution here): numpy has no erf.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))


class BertEncoder:
    """Token ids in, one unit-length sentence vector per input out."""

    def __init__(self, model_dir: Path) -> None:
        config = json.loads((model_dir / "config.json").read_text())
        if config.get("model_type") != "bert":
            raise ValueError(f"{model_dir}: model_type {config.get('model_type')!r}; this engine runs BERT encoders")
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.max_positions = config["max_position_embeddings"]
        self._eps = np.float32(config.get("layer_norm_eps", 1e-12))
        tensors = load_file(model_dir / "model.safetensors")
        w = {name.removeprefix("bert."): value.astype(np.float32) for name, value in tensors.items()}
        self._words = w["embeddings.word_embeddings.weight"]
        self._positions = w["embeddings.position_embeddings.weight"]
        self._token_type = w["embeddings.token_type_embeddings.weight"][0]
        self._ln_emb = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self._layers = [self._layer(w, f"encoder.layer.{i}.") for i in range(config["num_hidden_layers"])]

    @staticmethod
    def _layer(w: dict[str, np.ndarray], p: str) -> _Layer:
        attn = p + "attention.self."
        qkv = np.concatenate([w[f"{attn}{n}.weight"] for n in ("query", "key", "value")]).T
        qkv_bias = np.concatenate([w[f"{attn}{n}.bias"] for n in ("query", "key", "value")])
        return _Layer(
            qkv=np.ascontiguousarray(qkv),
            qkv_bias=qkv_bias,
            out=np.ascontiguousarray(w[p + "attention.output.dense.weight"].T),
            out_bias=w[p + "attention.output.dense.bias"],
            ln1=(w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
            up=np.ascontiguousarray(w[p + "intermediate.dense.weight"].T),
            up_bias=w[p + "intermediate.dense.bias"],
            down=np.ascontiguousarray(w[p + "output.dense.weight"].T),
            down_bias=w[p + "output.dense.bias"],
            ln2=(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
        )

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """``[len(batch), hidden]`` float32, mean-pooled over real tokens and L2-normalised."""
        length = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), length), dtype=np.int64)  # [PAD] is id 0
        mask = np.zeros((len(batch), length), dtype=np.float32)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1.0
        x = self._words[ids] + self._positions[:length] + self._token_type
        x = self._norm(x, self._ln_emb)
        # Padding gets a large negative score so softmax gives it no weight.
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        for layer in self._layers:
            x = self._block(x, bias, layer)
        summed = (x * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        return normalise(pooled)

    def _block(self, x: np.ndarray, bias: np.ndarray, layer: _Layer) -> np.ndarray:
        batch, length, hidden = x.shape
        head = hidden // self.heads
        qkv = (x @ layer.qkv + layer.qkv_bias).reshape(batch, length, 3, self.heads, head)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [batch, heads, length, head]
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(head)) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = self._norm(x + context @ layer.out + layer.out_bias, layer.ln1)
        return self._norm(x + _gelu(x @ layer.up + layer.up_bias) @ layer.down + layer.down_bias, layer.ln2)

    def _norm(self, x: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self._eps) * params[0] + params[1]


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (sentence-transformers' Normalize: divide by max(norm, 1e-12))."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
