"""Triton readiness: this model's, on a live server, whatever the server's other models are doing."""

from __future__ import annotations

from dataclasses import dataclass

from modelplex_kit.engine_health import triton_ready


@dataclass
class TritonState:
    """What a tritonclient aio client reports, as a real tritonserver 2.51 did while another model unloaded:
    live, not ready (strict readiness), this model ready."""

    live: bool = True
    server_ready: bool = False
    models_ready: tuple[str, ...] = ("minilm",)

    async def is_server_live(self, client_timeout: float | None = None) -> bool:
        return self.live

    async def is_server_ready(self, client_timeout: float | None = None) -> bool:
        return self.server_ready

    async def is_model_ready(self, model: str, client_timeout: float | None = None) -> bool:
        return model in self.models_ready


async def test_a_model_stays_ready_while_another_model_of_its_server_unloads():
    assert await triton_ready(TritonState(), "minilm")


async def test_a_model_that_is_not_loaded_or_a_server_that_is_not_live_is_not_ready():
    assert not await triton_ready(TritonState(models_ready=()), "minilm")
    assert not await triton_ready(TritonState(live=False, server_ready=True), "minilm")


async def test_a_probe_that_fails_is_not_ready():
    class Down(TritonState):
        async def is_server_live(self, client_timeout: float | None = None) -> bool:
            raise ConnectionError("connection refused")

    assert not await triton_ready(Down(), "minilm")
