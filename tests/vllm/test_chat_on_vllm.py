"""The e2e chat acceptance tests, unchanged, against a model served by a real vLLM.

Every test of tests/e2e/test_chat.py runs here as it stands; only the fixtures differ
(this folder's conftest: the same model ids, routed to the openai adapter in front of vLLM).
"""

from __future__ import annotations

import pytest

from tests.e2e.test_chat import *  # noqa: F403 - the same tests, collected again here

pytestmark = pytest.mark.vllm
