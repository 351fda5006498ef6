"""KServe's Python ModelServer hosting small image "diffusion" models, for the images Triton adapter.

KServe's ModelServer speaks the Open Inference Protocol (KServe v2), the same
gRPC service Triton serves, so the adapters talk to it exactly as to a Triton
pod (which needs a GPU). Behind it, the procedural renderers stand in for
diffusion pipelines:

- ``procedural-image`` (tensor out): prompt BYTES[1], width/height INT32[1], seed INT64[1],
  quality BYTES[1] -> image UINT8[H, W, 3];
- ``procedural-image-png`` (encoded out): the same inputs -> image BYTES[1] (PNG bytes), the layout
  the real Triton's repository (deploy/triton/) has no model for.

Run as ``python -m tests.support.kserve_visual --grpc-port P --http-port Q``;
``tests.support.kserve_visual.KServeVisual`` starts it as a subprocess and waits until it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import io

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


def _inputs(payload: InferRequest) -> dict[str, np.ndarray]:
    return {tensor.name: tensor.as_numpy() for tensor in payload.inputs}


def _text(value: np.ndarray) -> str:
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else str(item)


def _int(value: np.ndarray) -> int:
    return int(value.reshape(-1)[0])


class ImageModel(Model):
    def __init__(self, name: str, encoded: bool) -> None:
        super().__init__(name)
        self.encoded = encoded
        self.ready = True

    def _render(self, tensors: dict[str, np.ndarray]):
        from modelplex_images.engine import ImageSpec
        from modelplex_images.procedural import render_step

        spec = ImageSpec(
            prompt=_text(tensors["prompt"]), width=_int(tensors["width"]), height=_int(tensors["height"]),
            seed=_int(tensors["seed"]), quality=_text(tensors["quality"]) if "quality" in tensors else "auto",
        )
        return render_step(spec, 0, 1)

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        tensors = _inputs(payload)
        missing = {"prompt", "width", "height", "seed"} - set(tensors)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)}")
        image = await asyncio.to_thread(self._render, tensors)
        if self.encoded:
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            output = InferOutput("image", [1], "BYTES")
            output.set_data_from_numpy(np.array([buffer.getvalue()], dtype=np.object_), binary_data=True)
        else:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
            output = InferOutput("image", list(pixels.shape), "UINT8")
            output.set_data_from_numpy(pixels, binary_data=True)
        return InferResponse(payload.id, self.name, [output], use_binary_outputs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--http-port", type=int, default=8080)
    args = parser.parse_args()
    models = [ImageModel("procedural-image", encoded=False), ImageModel("procedural-image-png", encoded=True)]
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1, enable_docs_url=False).start(models)


if __name__ == "__main__":
    main()
