"""A fast, deterministic OpenAI-compatible engine for the benchmark.

It answers every chat request with the same canned completion (optionally
streamed as a fixed number of chunks), so that what ``make bench`` measures is
the platform in front of it, not a model. It is a benchmark fixture, never a
served model.
"""

from __future__ import annotations

import argparse
import json
import time

import uvicorn

STREAM_CHUNKS = 32


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "word " * STREAM_CHUNKS},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": STREAM_CHUNKS, "total_tokens": 12 + STREAM_CHUNKS},
        }
    ).encode()


def _chunks(model: str) -> list[bytes]:
    def frame(choices, usage=None) -> bytes:
        body = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    frames = [frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    frames += [
        frame([{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]) for _ in range(STREAM_CHUNKS)
    ]
    frames.append(frame([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    frames.append(
        frame([], {"prompt_tokens": 12, "completion_tokens": STREAM_CHUNKS, "total_tokens": 12 + STREAM_CHUNKS})
    )
    frames.append(b"data: [DONE]\n\n")
    return frames


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body or b"{}")
    model = request.get("model", "bench")
    if request.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for frame in _chunks(model):
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = _completion(model)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # A long keep-alive: the benchmark's connections idle while other targets take their turn.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=600,
    )
