"""tests/e2e/test_videos.py, unchanged, against procedural-video served by the real Triton (model `clips`).

The entry is the README's example catalog's (docs/examples/catalog-triton.yaml) with the job settings
and limits the acceptance tests rely on (those of tests/e2e/test_videos.py and visual_stack.py); both
content stores run, as there.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_videos import *  # noqa: F403 - the acceptance tests, collected here again
from tests.e2e.test_videos import FPS
from tests.e2e.visual_stack import VISUAL_KEY
from tests.triton.conftest import example_model, start_stack

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
# tests/e2e/visual_stack.py's limits for procedural-video.
CAPABILITIES = {"seconds": [4, 8, 12], "max_prompt_chars": 1000, "input_reference": True}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, content_store, triton):
    tmp = tmp_path_factory.mktemp("videos-on-triton")
    model = example_model("procedural-video", triton)
    settings = {
        "data_dir": str(tmp / "data"),
        "fps": FPS,
        "workers": 2,
        "lease_seconds": 5,
        "object_store_dir": str(content_store.directory),
    }
    model["engine"]["settings"] = model["engine"]["settings"] | settings
    model["capabilities"] = model["capabilities"] | CAPABILITIES
    env = content_store.s3.env("MODELPLEX_VIDEOS_", content_store.bucket) if content_store.s3 else {}
    running = start_stack(tmp, [model], VISUAL_KEY, env)
    running.start_supervising(interval=0.2)  # as `make run` does: a crashed process comes back
    yield running
    running.stop()
