"""tests/e2e/test_images.py, unchanged, against procedural-image served by the real Triton (model `pictures`).

The entry is the README's example catalog's (docs/examples/catalog-triton.yaml) with the limits the
acceptance tests rely on (those of tests/e2e/visual_stack.py): the edge, the images backend's Triton
adapter, and tritonserver's Python backend in between every request.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_images import *  # noqa: F403 - the acceptance tests, collected here again
from tests.e2e.visual_stack import VISUAL_KEY
from tests.triton.conftest import example_model, start_stack

pytestmark = pytest.mark.triton
# tests/e2e/visual_stack.py's limits for procedural-image.
CAPABILITIES = {"max_n": 4, "max_prompt_chars": 1000, "max_partial_images": 3}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, triton):
    model = example_model("procedural-image", triton)
    model["capabilities"] = model["capabilities"] | CAPABILITIES
    running = start_stack(tmp_path_factory.mktemp("images-on-triton"), [model], VISUAL_KEY)
    yield running
    running.stop()
