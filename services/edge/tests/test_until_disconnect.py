"""until_disconnect: backend work cancelled when its HTTP client leaves, with one watcher task per call."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelplex_edge.grpc_calls import until_disconnect
from modelplex_kit.errors import ServiceError


class FakeRequest:
    """receive() as after the body was read: it returns only when the client leaves."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}


async def test_the_work_runs_in_the_callers_task_beside_one_watcher():
    request = FakeRequest()
    seen: list[int] = []

    async def work() -> str:
        seen.append(len(asyncio.all_tasks()))
        return "done"

    before = len(asyncio.all_tasks())
    assert await until_disconnect(request, work()) == "done"
    assert seen == [before + 1]  # the watcher only


async def test_a_client_that_leaves_cancels_the_work_and_gets_a_cancelled_error():
    request = FakeRequest()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.01, request.leave.set)
    with pytest.raises(ServiceError) as error:
        await until_disconnect(request, work())
    assert error.value.status == grpc.StatusCode.CANCELLED
    assert cancelled.is_set()
    # The caller's task is not left cancelled: what it does next (accounting the call) still runs.
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0.01)


async def test_a_client_leaving_after_the_work_is_done_cancels_nothing():
    request = FakeRequest()

    async def work() -> str:
        return "done"

    assert await until_disconnect(request, work()) == "done"
    request.leave.set()
    await asyncio.sleep(0.01)  # would raise CancelledError if the watcher still cancelled this task
    assert asyncio.current_task().cancelling() == 0


async def test_a_cancel_from_elsewhere_stays_a_cancel():
    request = FakeRequest()

    async def caller() -> None:
        await until_disconnect(request, asyncio.Event().wait())

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
