"""Batch lines are metered to their batch's key, but never charged to its interactive TPM."""

from __future__ import annotations

import json

from modelplex.v1 import common_pb2
from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRecord, KeyRing, KeysFile
from modelplex_gatekeeper.store import MemoryStore, UsageLog

KEY = "sk-batch-metering-0123456789"


def _gate(tmp_path) -> Gate:
    keys = KeysFile()
    keys.add(KEY, KeyRecord(name="k", hash="", project="p", tpm=1000))
    keys.save(tmp_path / "keys.yaml")
    return Gate(KeyRing(tmp_path / "keys.yaml"), MemoryStore(900, UsageLog(tmp_path / "usage.jsonl")))


async def test_batch_lines_are_metered_outside_the_keys_tpm(tmp_path):
    gate = _gate(tmp_path)
    created = await gate.admit(pb.AdmitRequest(api_key=KEY, endpoint="batches"))  # identity only
    assert created.allowed and created.ticket and created.project == "p"
    # An interactive request holds 100 tokens (so the key's GCRA clock is running, not idle in the past).
    await gate.admit(pb.AdmitRequest(api_key=KEY, model="m", endpoint="chat.completions", estimated_tokens=100))
    before = await gate.admit(pb.AdmitRequest(api_key=KEY))
    for _ in range(3):
        await gate.account(
            pb.AccountRequest(
                ticket=created.ticket,
                model="m",
                endpoint="batch:chat.completions",
                usage=common_pb2.Usage(prompt_tokens=300, completion_tokens=100, total_tokens=400),
            )
        )
    after = await gate.admit(pb.AdmitRequest(api_key=KEY))
    # 1200 tokens of batch work: the key's interactive budget (1000 a minute) is untouched...
    assert after.rate_limit.remaining_tokens == before.rate_limit.remaining_tokens == 900
    # ...but every line is in its usage log, under its key and project.
    records = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert [(r["key"], r["project"], r["endpoint"], r["total_tokens"]) for r in records] == [
        ("k", "p", "batch:chat.completions", 400)
    ] * 3


async def test_interactive_usage_is_still_charged(tmp_path):
    gate = _gate(tmp_path)
    admitted = await gate.admit(
        pb.AdmitRequest(api_key=KEY, model="m", endpoint="chat.completions", estimated_tokens=100)
    )
    await gate.account(
        pb.AccountRequest(
            ticket=admitted.ticket, model="m", endpoint="chat.completions", usage=common_pb2.Usage(total_tokens=400)
        )
    )
    assert (await gate.admit(pb.AdmitRequest(api_key=KEY))).rate_limit.remaining_tokens == 600
    # Other identity checks get no ticket: only a batch's creation is accounted later.
    assert not (await gate.admit(pb.AdmitRequest(api_key=KEY, endpoint="files"))).ticket
