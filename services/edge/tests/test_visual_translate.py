"""Pure translation pieces of the images and videos endpoints."""

from __future__ import annotations

import pytest

from modelplex.v1 import images_pb2, videos_pb2
from modelplex_edge.admission import Consumption
from modelplex_edge.endpoints.images import translate as images
from modelplex_edge.endpoints.videos import translate as videos
from tests.support.openapi import validate


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 100, 0)),
        ("bytes=100-", (100, 0, 0)),
        ("bytes=-500", (0, 0, 500)),
        ("bytes=5-4", None),  # malformed: ignored, the whole file is sent
        ("bytes=0-1,5-9", None),  # several ranges: not offered, the whole file is sent
        ("items=0-1", None),
        ("bytes=-0", None),
        (None, None),
    ],
)
def test_byte_range(header, expected):
    assert videos.byte_range(header) == expected


def test_failed_job_is_a_valid_video_resource():
    job = videos_pb2.VideoJob(
        id="video_1", model="m", status=videos_pb2.VIDEO_STATUS_FAILED, created_at=10, completed_at=20,
        width=720, height=1280, seconds=4, prompt="p", error_code="internal_error", error_message="it broke",
    )
    body = videos.resource(job)
    validate(body, "VideoResource")
    assert body["error"] == {"code": "internal_error", "message": "it broke"}
    assert body["expires_at"] is None and body["seconds"] == "4"


def test_queued_job_has_no_completion_time():
    job = videos_pb2.VideoJob(id="video_2", model="m", status=videos_pb2.VIDEO_STATUS_QUEUED, created_at=10,
                              width=1280, height=720, seconds=8, remixed_from_video_id="video_1")
    body = videos.resource(job)
    validate(body, "VideoResource")
    assert body["completed_at"] is None and body["error"] is None and body["remixed_from_video_id"] == "video_1"


def test_video_metering_skips_replays():
    used = Consumption()
    videos.meter_new_job(videos_pb2.VideoJob(seconds=8), used)
    videos.meter_new_job(videos_pb2.VideoJob(seconds=8, replayed=True), used)
    assert (used.units, used.unit_kind) == (8, "video_seconds")


def test_image_metering_counts_final_images_only():
    used = Consumption()
    images.meter(images_pb2.ImageStreamEvent(partial=True), used)
    images.meter(images_pb2.ImageStreamEvent(partial=False), used)
    images.meter(images_pb2.GenerateImagesResponse(images=[images_pb2.GeneratedImage()] * 2), used)
    assert (used.units, used.unit_kind) == (3, "images")


def test_small_sizes_are_not_reported_as_gpt_image_sizes():
    request = images_pb2.GenerateImagesRequest(width=256, height=256, output_format="png", quality="hd",
                                               background="auto")
    response = images_pb2.GenerateImagesResponse(created=1, images=[images_pb2.GeneratedImage(data=b"x")])
    body = images.from_proto(response, request)
    validate(body, "ImagesResponse")
    assert "size" not in body and body["quality"] == "high" and body["background"] == "opaque"
