"""Every endpoint folder is mounted without being listed; upload endpoints say so themselves."""

from __future__ import annotations

from pathlib import Path

from modelplex_edge import endpoints


def test_every_endpoint_folder_with_a_router_is_mounted() -> None:
    root = Path(endpoints.__file__).parent
    folders = {p.name for p in root.iterdir() if (p / "router.py").is_file()}
    assert {"chat", "completions", "embeddings", "images", "videos", "speech", "transcriptions"} <= folders
    assert len(endpoints.ROUTERS) == len(folders)
    paths = {route.path for router in endpoints.ROUTERS for route in router.routes}
    assert {"/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions", "/v1/videos"} <= paths


def test_upload_endpoints_get_the_upload_body_limit() -> None:
    assert {"/v1/audio/transcriptions", "/v1/audio/translations", "/v1/files"} == endpoints.UPLOAD_PATHS
    assert set(endpoints.BODY_LIMITS) == {"/v1/files"}
