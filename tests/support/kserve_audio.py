"""A small real TTS model hosted by KServe's own Python ``ModelServer`` (the ``kserve`` package),
speaking the Open Inference Protocol (KServe v2 / Triton's gRPC) on loopback: the one-response path,
which the real Triton's decoupled ``espeak`` (deploy/triton/) does not take.

- ``espeak``: text to speech: BYTES ``text`` [1] and ``voice`` [1] in; INT16 ``audio`` [samples]
  out at espeak-ng's 22050 Hz. Not decoupled: one response per request (KServe's ModelServer has no
  ModelStreamInfer).

Run: ``python -m tests.support.kserve_audio --grpc-port 8001 --http-port 8080``.
"""

from __future__ import annotations

import argparse

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

from modelplex_speech.adapters.espeak import EspeakEngine
from modelplex_speech.settings import EspeakSettings

WHISPER_SOT = "<|startoftranscript|>"


def _tensors(payload: InferRequest) -> dict[str, np.ndarray]:
    return {tensor.name: np.asarray(tensor.as_numpy()) for tensor in payload.inputs}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EspeakSpeech(Model):
    def __init__(self) -> None:
        super().__init__("espeak")
        self.engine = EspeakEngine(EspeakSettings())
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        tensors = _tensors(payload)
        text, voice = _text(tensors["text"].reshape(-1)[0]), _text(tensors["voice"].reshape(-1)[0])
        chunks = [pcm async for pcm in self.engine.synthesize(text, voice=voice, speed=1.0, instructions="")]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        output = InferOutput(name="audio", shape=[len(audio)], datatype="INT16")
        output.set_data_from_numpy(audio.astype(np.int16))
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1).start([EspeakSpeech()])


if __name__ == "__main__":
    main()
