"""python -m modelplex_images: serve ImagesService over the configured engine."""

from __future__ import annotations

from modelplex.v1 import catalog_pb2, images_pb2, images_pb2_grpc
from modelplex_images.adapters import load_engine
from modelplex_images.servicer import ImagesServicer
from modelplex_images.settings import ImagesSettings
from modelplex_kit.grpc_server import run, serve
from modelplex_kit.modalities.images import FORMATS


def capabilities(settings: ImagesSettings, max_partial_images: int) -> catalog_pb2.ImagesCapabilities:
    return catalog_pb2.ImagesCapabilities(
        sizes=settings.size_list(),
        max_n=settings.max_n,
        max_prompt_chars=settings.max_prompt_chars,
        max_partial_images=max_partial_images,
        output_formats=list(FORMATS),
    )


async def main(settings: ImagesSettings) -> None:
    engine = load_engine(settings)
    servicer = ImagesServicer(
        engine, capabilities(settings, engine.max_partial_images), settings.max_concurrency, settings.max_queue
    )

    def register(server):
        images_pb2_grpc.add_ImagesServiceServicer_to_server(servicer, server)
        return [images_pb2.DESCRIPTOR.services_by_name["ImagesService"].full_name]

    await serve("images", settings, register, on_shutdown=engine.close, ready=getattr(engine, "ready", None))


if __name__ == "__main__":
    settings = ImagesSettings()
    run("images", settings, lambda: main(settings))
