"""Videos: requests -> VideosService messages, VideoJob -> OpenAI's VideoResource, and HTTP ranges."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from modelplex.v1 import catalog_pb2, common_pb2, videos_pb2
from modelplex_edge.admission import Consumption
from modelplex_edge.endpoints.videos.protocol import VideoCreateRequest
from modelplex_kit.errors import invalid
from modelplex_kit.modalities.images import parse_size
from modelplex_kit.modalities.videos import check_seconds

STATUS = {
    videos_pb2.VIDEO_STATUS_QUEUED: "queued",
    videos_pb2.VIDEO_STATUS_IN_PROGRESS: "in_progress",
    videos_pb2.VIDEO_STATUS_COMPLETED: "completed",
    videos_pb2.VIDEO_STATUS_FAILED: "failed",
}
# How long the SDK's create_and_poll waits between polls of an unfinished job.
POLL_AFTER_MS = "500"
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)


def meter_new_job(message: Any, used: Consumption) -> None:
    """Create and remix: a new job is charged its seconds of video when queued (an idempotent replay is not)."""
    if isinstance(message, videos_pb2.VideoJob) and not message.replayed:
        used.units += message.seconds
        used.unit_kind = "video_seconds"


def meter_nothing(message: Any, used: Consumption) -> None:
    """Lookups and downloads consume no generation."""


def _reference_from_json(body: VideoCreateRequest) -> tuple[bytes, str]:
    ref = body.input_reference
    if ref is None:
        return b"", ""
    if ref.file_id:
        raise invalid("input_reference.file_id is not supported: Modelplex has no Files API. "
                      "Send the image as a data URL in input_reference.image_url, or upload it (multipart).",
                      "input_reference.file_id", code="unsupported_parameter")
    match = _DATA_URL.match(ref.image_url or "")
    if match is None:
        raise invalid("input_reference.image_url must be a base64 data URL (data:image/png;base64,...); "
                      "Modelplex does not fetch remote URLs.", "input_reference.image_url")
    try:
        return base64.b64decode(match["data"], validate=True), match["mime"]
    except binascii.Error:
        raise invalid("input_reference.image_url is not valid base64.", "input_reference.image_url") from None


def seconds(body: VideoCreateRequest, model: catalog_pb2.Model) -> int:
    """The duration asked for (the model's first when none), checked against the model before admission
    reserves it: a duration the model does not serve is a 400, never a 429 nor a silent default."""
    caps = model.capabilities.videos
    asked = caps.seconds[0] if body.seconds is None else body.seconds
    check_seconds(asked, caps)
    return asked


def to_proto(
    body: VideoCreateRequest,
    model: catalog_pb2.Model,
    meta: common_pb2.RequestMeta,
    idempotency_key: str,
    reference: tuple[bytes, str] | None = None,
) -> videos_pb2.CreateVideoRequest:
    caps = model.capabilities.videos
    size = body.size or caps.sizes[0]
    try:
        width, height = parse_size(size)
    except ValueError:
        raise invalid(f"Invalid size '{size}'. Supported sizes for this model: {', '.join(caps.sizes)}.",
                      "size") from None
    data, mime = reference if reference is not None else _reference_from_json(body)
    request = videos_pb2.CreateVideoRequest(
        meta=meta, model=model.id, prompt=body.prompt, width=width, height=height,
        seconds=seconds(body, model), idempotency_key=idempotency_key,
        input_reference=data, input_reference_mime_type=mime,
    )
    if body.seed is not None:
        request.seed = body.seed
    return request


def resource(job: videos_pb2.VideoJob) -> dict[str, Any]:
    """OpenAI's VideoResource."""
    finished = job.status in (videos_pb2.VIDEO_STATUS_COMPLETED, videos_pb2.VIDEO_STATUS_FAILED)
    failed = job.status == videos_pb2.VIDEO_STATUS_FAILED
    return {
        "id": job.id,
        "object": "video",
        "model": job.model,
        "status": STATUS[job.status],
        "progress": job.progress,
        "created_at": job.created_at,
        "completed_at": job.completed_at if finished and job.completed_at else None,
        "expires_at": job.expires_at or None,
        "prompt": job.prompt or None,
        "size": f"{job.width}x{job.height}",
        "seconds": str(job.seconds),
        "remixed_from_video_id": job.remixed_from_video_id or None,
        "error": {"code": job.error_code or "internal_error", "message": job.error_message} if failed else None,
    }


def page(response: videos_pb2.ListVideosResponse) -> dict[str, Any]:
    data = [resource(job) for job in response.videos]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": response.has_more,
    }


def deleted(job: videos_pb2.VideoJob) -> dict[str, Any]:
    return {"id": job.id, "object": "video.deleted", "deleted": True}


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None) -> tuple[int, int, int] | None:
    """HTTP Range -> (offset, length, suffix_length); None (serve it all) for no, or several, ranges.

    Malformed single ranges are ignored, as RFC 9110 allows.
    """
    match = _RANGE.match((header or "").strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        return (0, 0, int(last)) if int(last) > 0 else None
    start = int(first)
    if last and int(last) < start:
        return None
    return start, (int(last) - start + 1) if last else 0, 0
