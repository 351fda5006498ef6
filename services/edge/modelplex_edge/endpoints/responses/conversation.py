"""Conversation state: the stored chain behind ``previous_response_id``, within its bounds.

Each stored response holds only its own input items and output; continuing walks the chain back
(each step one store read) and replays it oldest first. Instructions are not carried over, as
OpenAI documents: only the new request's ``instructions`` apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelplex_edge.endpoints.responses.protocol import InputItem, parse_item
from modelplex_edge.endpoints.responses.store import ResponseStore, StoredResponse
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.wire import MAX_ITEMS
from modelplex_kit.errors import invalid

PARAM = "previous_response_id"
NOT_FOUND = "previous_response_not_found"


@dataclass(slots=True)
class Chain:
    """What comes before a new request: the replayed items, and how long the chain is."""

    items: list[InputItem] = field(default_factory=list)
    #: Responses before the new one.
    depth: int = 0


def _tokens_of(record: StoredResponse) -> int:
    usage = record.response.get("usage") or {}
    return int(usage.get("total_tokens") or 0)


def _user_message(item: dict[str, Any]) -> bool:
    return item.get("type", "message") == "message" and item.get("role") == "user"


def _newest(raw: list[dict[str, Any]], room: int, truncate: bool, previous_id: str) -> list[dict[str, Any]]:
    """The chain's items within ``room`` (what MAX_ITEMS leaves beside the new input): with ``truncate``, its
    newest turns (from a user message on, as truncation drops them), else a 400. A chain grows by up to
    MAX_ITEMS a response: replaying all of it would cost the loop in proportion to the whole conversation."""
    if len(raw) <= room:
        return raw
    if not truncate:
        raise invalid(
            f"The conversation of '{previous_id}' holds {len(raw)} items; with the new input that is more than "
            f"the {MAX_ITEMS} a request may hold. Set truncation to 'auto' or start a new conversation.",
            PARAM,
            code="array_above_max_length",
        )
    start = len(raw) - room
    while start < len(raw) and not _user_message(raw[start]):
        start += 1
    return raw[start:]


async def load_chain(
    store: ResponseStore,
    scope: str,
    previous_id: str | None,
    settings: EdgeSettings,
    room: int = MAX_ITEMS,
    truncate: bool = False,
) -> Chain:
    """The stored conversation before a new request, within ``room`` items (see ``_newest``)."""
    if not previous_id:
        return Chain()
    latest = await store.get(scope, previous_id)
    if latest is None:
        raise invalid(f"Previous response with id '{previous_id}' not found.", PARAM, code=NOT_FOUND)
    if latest.depth + 1 > settings.responses_max_chain_depth:
        raise invalid(
            f"The conversation is too long: at most {settings.responses_max_chain_depth} responses can be chained "
            "with previous_response_id. Start a new conversation.",
            PARAM,
        )
    if _tokens_of(latest) > settings.responses_max_chain_tokens:
        raise invalid(
            f"The conversation is too long: its last turn used {_tokens_of(latest)} tokens, beyond the "
            f"{settings.responses_max_chain_tokens} a chain may hold. Start a new conversation.",
            PARAM,
        )
    turns: list[list[dict[str, Any]]] = []
    record: StoredResponse | None = latest
    while record is not None:
        turns.append(record.input_items + record.response["output"])
        earlier = record.response.get("previous_response_id")
        record = await store.get(scope, earlier) if earlier else None
        if earlier and record is None:  # expired or deleted: replaying a partial past would mislead the model
            raise invalid(
                f"Response '{earlier}', earlier in the conversation of '{previous_id}', has expired or was deleted.",
                PARAM,
                code=NOT_FOUND,
            )
    raw = _newest([item for turn in reversed(turns) for item in turn], room, truncate, previous_id)
    return Chain([parse_item(item, i) for i, item in enumerate(raw)], latest.depth)
