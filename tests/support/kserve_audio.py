"""Two small real audio models hosted by KServe's own Python ``ModelServer`` (the ``kserve`` package),
speaking the Open Inference Protocol (KServe v2 / Triton's gRPC) on loopback.

- ``whisper``: the TensorRT-LLM Whisper (whisper_bls) layout the transcription Triton adapter
  expects: FP32 ``WAV`` [1, samples] at 16 kHz, INT32 ``WAV_LENS`` [1, 1], BYTES ``TEXT_PREFIX``
  [1, 1] in; BYTES ``TRANSCRIPTS`` [1, 1] out. Behind it, pocketsphinx's bundled en-us model
  recognises the window as one utterance (it is no Whisper: it cannot translate, and says so).
- ``espeak``: text to speech: BYTES ``text`` [1] and ``voice`` [1] in; INT16 ``audio`` [samples]
  out at espeak-ng's 22050 Hz. Not decoupled: one response per request (KServe's ModelServer has no
  ModelStreamInfer).

Run: ``python -m tests.support.kserve_audio --grpc-port 8001 --http-port 8080``.
"""

from __future__ import annotations

import argparse

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from pocketsphinx import Decoder

from modelplex_speech.adapters.espeak import EspeakEngine
from modelplex_speech.settings import EspeakSettings

WHISPER_SOT = "<|startoftranscript|>"


def _tensors(payload: InferRequest) -> dict[str, np.ndarray]:
    return {tensor.name: np.asarray(tensor.as_numpy()) for tensor in payload.inputs}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PocketsphinxWhisper(Model):
    def __init__(self) -> None:
        super().__init__("whisper")
        self.decoder = Decoder(samprate=16000, loglevel="FATAL")
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        tensors = _tensors(payload)
        wav, lengths, prefix = tensors["WAV"], tensors["WAV_LENS"], _text(tensors["TEXT_PREFIX"].reshape(-1)[0])
        if wav.dtype != np.float32 or wav.ndim != 2 or lengths.reshape(-1)[0] != wav.shape[1]:
            raise ValueError(f"expected FP32 WAV [1, n] and its length, got {wav.dtype} {wav.shape} {lengths}")
        if WHISPER_SOT not in prefix or "<|translate|>" in prefix:
            raise ValueError(f"this model only transcribes; prefix {prefix!r}")
        pcm = (np.clip(wav[0], -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, False, True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        text = hypothesis.hypstr if hypothesis is not None else ""
        output = InferOutput(name="TRANSCRIPTS", shape=[1, 1], datatype="BYTES")
        output.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id)


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
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1).start(
        [PocketsphinxWhisper(), EspeakSpeech()]
    )


if __name__ == "__main__":
    main()
