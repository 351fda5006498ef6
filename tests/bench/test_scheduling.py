"""The scheduling benchmark's own arithmetic: its capacity, its arrivals, and where its section goes."""

from __future__ import annotations

from pathlib import Path

from bench.engine_sim import SimParams, chat_text, tokens_of
from bench.platform_overhead import KEEP_MARKER
from bench.scheduling import HEADING, Workload, arrivals, capacity, write_section


def test_capacity_is_the_uncached_prefill_lane_or_the_slots_whichever_binds() -> None:
    workload = Workload(tenants=1, system_tokens=(98, 98), tail_tokens=(100, 100), output_tokens=(10, 30))
    # "<|system|> " + 98 words + " <|user|> " + 100 words: 200 prompt tokens, 20 output tokens on average.
    assert workload.mean_prompt_tokens() == 200
    slots_bind = SimParams(max_running=1, prefill_seconds_per_token=0.001, decode_seconds_per_token=0.01)
    assert capacity(slots_bind, workload, replicas=8) == 8 * 1 / (200 * 0.001 + 20 * 0.01)
    lane_binds = SimParams(max_running=64, prefill_seconds_per_token=0.001, decode_seconds_per_token=0.01)
    assert capacity(lane_binds, workload, replicas=8) == 8 / (200 * 0.001)


def test_arrivals_are_poisson_at_the_rate_and_only_after_the_warmup_measured() -> None:
    workload = Workload()
    plan = arrivals(workload, rate=50.0, warmup=10.0, seconds=90.0, seed=1)
    assert 0.9 * 5000 < len(plan) < 1.1 * 5000
    assert all(a.measured == (a.at >= 10.0) for a in plan)
    assert len({a.tail for a in plan}) == len(plan)  # every user message unique
    top = sum(a.tenant == 0 for a in plan) / len(plan)
    assert abs(top - workload.popularity()[0]) < 0.03
    assert plan == arrivals(workload, rate=50.0, warmup=10.0, seconds=90.0, seed=1)  # same for every policy
    prompt = tokens_of(chat_text(workload.messages(plan[0].tenant, plan[0].tail, workload.system_prompts())))
    assert len(prompt) > workload.system_tokens[0]


def test_the_section_is_added_above_the_keep_marker_then_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n## Other\n\nmeasured\n\n{KEEP_MARKER}\n\n## By hand\n\nkept\n")
    write_section(doc, f"{HEADING}\n\nfirst")
    write_section(doc, f"{HEADING}\n\nsecond")
    text = doc.read_text()
    assert text.count(HEADING) == 1 and "first" not in text
    assert text.index("## Other") < text.index("second") < text.index(KEEP_MARKER) < text.index("kept")
