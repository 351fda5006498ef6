"""all-MiniLM-L6-v2 hosted by KServe's own Python ``ModelServer`` (the ``kserve`` package),
speaking the Open Inference Protocol (KServe v2 / Triton's gRPC) on loopback.

The model's layout is the one the embeddings Triton adapter expects (bge-m3-style):
BYTES ``text`` ``[batch, 1]`` in, FP32 ``embedding`` ``[batch, 384]`` out. The
maths is the local engine's, so the test can compare the two paths' vectors; the
protocol, its encoding and the server are KServe's.

Run: ``python -m tests.support.kserve_minilm --grpc-port 8001 --http-port 8080``.
"""

from __future__ import annotations

import argparse

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

from modelplex.v1 import embeddings_pb2 as pb
from modelplex_embeddings.adapters.local import LocalEngine
from modelplex_embeddings.settings import LocalSettings

NAME = "minilm"


class MiniLM(Model):
    def __init__(self) -> None:
        super().__init__(NAME)
        self.engine: LocalEngine | None = None
        self.load()

    def load(self) -> bool:
        self.engine = LocalEngine(LocalSettings())
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        (tensor,) = payload.inputs
        if tensor.name != "text" or tensor.datatype != "BYTES":
            raise ValueError(f"expected BYTES input 'text', got {tensor.datatype} {tensor.name!r}")
        texts = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(tensor.as_numpy()).reshape(-1)]
        vectors = await self.engine.embed(self.engine.prepare([pb.EmbedInput(text=t) for t in texts]))
        output = InferOutput(name="embedding", shape=list(vectors.shape), datatype="FP32")
        output.set_data_from_numpy(vectors)
        return InferResponse(model_name=NAME, infer_outputs=[output], response_id=payload.id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1).start([MiniLM()])


if __name__ == "__main__":
    main()
