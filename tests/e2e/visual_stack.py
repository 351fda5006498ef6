"""A stack serving just the images and videos models, for the visual end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from modelplex_kit.devstack import Stack
from tests.support import stacks
from tests.support.ports import free_port

VISUAL_KEY = "sk-modelplex-visual"


def visual_catalog(tmp: Path, videos_settings: dict | None = None, videos_backend: str = "") -> Path:
    models = [
        {
            "id": "procedural-image",
            "modality": "images",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "procedural"},
            "capabilities": {
                "sizes": ["1024x1024", "256x256", "512x512", "1024x1536", "1536x1024"],
                "max_n": 4,
                "max_prompt_chars": 1000,
                "max_partial_images": 3,
            },
            "created": 1764028800,
        },
        {
            "id": "procedural-video",
            "modality": "videos",
            "backend": videos_backend or f"127.0.0.1:{free_port()}",
            "engine": {"kind": "external" if videos_backend else "procedural", "settings": videos_settings or {}},
            "capabilities": {"seconds": [4, 8, 12], "max_prompt_chars": 1000, "input_reference": True},
            "created": 1764028800,
        },
    ]
    path = stacks.write_catalog(tmp, models)
    return path


def start_visual_stack(tmp: Path, env: dict[str, str] | None = None, **catalog_kwargs) -> Stack:
    env = {"MODELPLEX_DEV_API_KEY": VISUAL_KEY, "MODELPLEX_LOG_LEVEL": "info", **(env or {})}
    return stacks.start_stack(visual_catalog(tmp, **catalog_kwargs), tmp, env=env)
