"""The scheduling benchmark's LoRA variant end to end, tiny: 2 simulated replicas, one real text backend,
5 adapters for a few seconds. Structure only (nothing here depends on timing): every
request answered under its adapter's name, loads counted by the simulators, the section written."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.engine_sim import SimParams
from bench.platform_overhead import KEEP_MARKER
from bench.scheduling import (
    LORA_HEADING,
    LoraWorkload,
    lora_engine,
    lora_plan,
    lora_report,
    run_lora,
    write_section,
)


def test_a_tiny_lora_run_answers_everything_under_its_adapter_and_counts_the_loads(tmp_path: Path) -> None:
    # As many slots per replica as adapters: nothing is ever evicted, so no unload can race a load (and be refused
    # by the engine, failing its request): what is asserted cannot depend on timing.
    workload = LoraWorkload(tenants=5, system_tokens=(64, 80), tail_tokens=(8, 16), output_tokens=(40, 60))
    params = SimParams(max_running=4, lora_slots=5, lora_load_ms=100)
    args = argparse.Namespace(replicas=2, adapter_slots=5, warmup=0.3, seconds=3.5, sync_url="")
    load = 0.4
    # The plan (seeded, the same every run) has adapters first asked for well inside the measured window: their
    # first loads are counted there, whatever the timing.
    _, plan = lora_plan(workload, params, args.replicas, load, args.warmup, args.seconds)
    first: dict[int, float] = {}
    for arrival in plan:
        first.setdefault(arrival.tenant, arrival.at)
    assert any(at > args.warmup + 0.3 for at in first.values())

    result = run_lora("affinity", load, 1, args, tmp_path, workload, params)

    assert result.sent == len(plan) and result.measured > 0
    assert result.errors == 0, result.error_examples
    assert result.answered == result.sent, result.error_examples
    assert result.sim["modelplex_sim_lora_loads"] > 0  # cold loads in the measured window, as the engines count them
    assert sum(result.refusals.values()) == 0
    assert result.sim["modelplex_sim_model_not_found"] == 0
    # Every request ran on an engine under its adapter's name, and nothing else did.
    asked = {workload.names()[i] for i in first}
    assert set(result.served_by_adapter) <= set(workload.names())
    assert {name for name, n in result.served_by_adapter.items() if n} == asked
    assert sum(result.served_by_adapter.values()) == result.sent
    assert result.pool_loads.get("failed", 0.0) == 0
    assert len(result.ttfts_ms) == result.measured

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{KEEP_MARKER}\n")
    args = argparse.Namespace(
        replicas=2,
        adapter_slots=5,
        warmup=0.3,
        seconds=3.5,
        adapters=5,
        zipf=1.0,
        lora_load_ms=100.0,
        share_picks=True,
    )
    write_section(doc, lora_report([result], args, wall=1.0), LORA_HEADING)
    text = doc.read_text()
    assert text.count(LORA_HEADING) == 1 and text.index(LORA_HEADING) < text.index(KEEP_MARKER)
    assert "| 1 | 40% | affinity |" in text


def test_the_lora_engine_holds_the_adapters_the_backend_may_load() -> None:
    params = lora_engine(slots=4)
    assert params.lora_slots == 4 and params.lora_load_ms == 300
    # Every running sequence's tokens fit the KV blocks (nothing preempted; kv_cache_usage stays below 1).
    longest = LoraWorkload().system_tokens[1] + LoraWorkload().tail_tokens[1] + LoraWorkload().output_tokens[1] + 8
    assert params.max_running * longest <= params.kv_blocks * params.block_tokens
