"""python -m modelplex_videos: serve VideosService, with its worker pool, over the configured engine and store."""

from __future__ import annotations

from modelplex.v1 import catalog_pb2, videos_pb2, videos_pb2_grpc
from modelplex_kit.grpc_server import run, serve
from modelplex_kit.objectstore import open_object_store
from modelplex_videos.adapters import load_engine
from modelplex_videos.content import VideoContent
from modelplex_videos.jobs import JobStore, Limits, SQLiteJobStore
from modelplex_videos.servicer import VideosServicer
from modelplex_videos.settings import VideosSettings
from modelplex_videos.worker import WorkerPool


def open_store(settings: VideosSettings) -> JobStore:
    if settings.store == "redis":
        from modelplex_videos.redis_store import RedisJobStore

        return RedisJobStore(settings.redis_url, settings.idempotency_ttl_seconds)
    return SQLiteJobStore(settings.sqlite_path, settings.idempotency_ttl_seconds)


def capabilities(settings: VideosSettings) -> catalog_pb2.VideosCapabilities:
    return catalog_pb2.VideosCapabilities(
        sizes=settings.size_list(),
        seconds=settings.seconds_list(),
        input_reference=True,
        max_prompt_chars=settings.max_prompt_chars,
    )


async def main(settings: VideosSettings) -> None:
    engine, store = load_engine(settings), open_store(settings)
    content = VideoContent(open_object_store(settings, default_dir=settings.content_dir))
    pool = WorkerPool(store, content, engine, settings)
    limits = Limits(settings.max_queue, settings.max_queue_per_principal)
    servicer = VideosServicer(store, content, capabilities(settings), limits, on_queued=pool.wake)

    def register(server):
        videos_pb2_grpc.add_VideosServiceServicer_to_server(servicer, server)
        return [videos_pb2.DESCRIPTOR.services_by_name["VideosService"].full_name]

    async def shutdown() -> None:
        await pool.stop()  # unfinished jobs keep their rows: re-run after the restart
        await engine.close()
        await store.close()
        await content.close()

    pool.start()
    await serve("videos", settings, register, on_shutdown=shutdown, ready=getattr(engine, "ready", None))


if __name__ == "__main__":
    settings = VideosSettings()
    run("videos", settings, lambda: main(settings))
