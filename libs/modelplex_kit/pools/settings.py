"""The settings every pooled remote engine reads, mixed into each backend's upstream settings.

The service's own ``env_prefix`` applies, so the text backend reads ``MODELPLEX_TEXT_UPSTREAM_URL``,
``MODELPLEX_TEXT_POOL_POLICY`` and so on; embeddings reads ``MODELPLEX_EMBEDDINGS_...``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Discovery = Literal["static", "dns", "endpointslices", "inferencepool"]
Policy = Literal["affinity", "least_loaded", "round_robin"]


class PoolSettings(BaseModel):
    """A mixin of fields: each service's settings class (with its env_prefix) reads them from the environment."""

    # One base URL (a pool of one), or several separated by commas (a static pool), e.g.
    # http://vllm-0:8000/v1,http://vllm-1:8000/v1. With another discovery, its scheme and path
    # (and, for dns, its host and port) make each discovered host:port a base URL.
    upstream_url: str = ""
    # Where the replicas come from: the list above; the addresses a (headless Service) name
    # resolves to, re-resolved every dns_interval_seconds; a Service's EndpointSlices; an
    # InferencePool's pods (the last two: modelplex_kit.pools.kubernetes).
    upstream_discovery: Discovery = "static"
    # endpointslices: the engine Service's name; inferencepool: the InferencePool's name;
    # both: the port's name or number (empty: the configured URL's port).
    upstream_service: str = ""
    upstream_inference_pool: str = ""
    upstream_port: str = ""
    dns_interval_seconds: float = Field(5.0, gt=0)
    # affinity: least load, but requests sharing a prompt prefix or a session (prompt_cache_key,
    # user) go to the replica that served it while it is not much busier than the least loaded;
    # least_loaded; round_robin (what a ClusterIP Service does per connection, for comparison).
    pool_policy: Policy = "affinity"
    # How often each replica's /metrics is read, and how long one read may take.
    pool_scrape_interval_seconds: float = Field(0.25, gt=0)
    pool_scrape_timeout_seconds: float = Field(1.0, gt=0)
    # Triton pools: the port of each replica's Prometheus metrics (Triton's is 8002), read for its
    # queue (nv_inference_pending_request_count); 0: in-flight counts only. HTTP pools read /metrics
    # beside each replica's /v1 and ignore it.
    pool_metrics_port: int = Field(0, ge=0, le=65535)
    # How often each replica's readiness check (/health, /v1/models) runs besides the scrape.
    pool_ready_check_seconds: float = Field(2.0, gt=0)
    # A replica whose backlog (requests waiting for their first token: the engine's queue, or this
    # backend's requests there not yet answering) exceeds the least backlogged one's by this factor
    # (backlog + 1 on both sides) loses its affinity: one hot prefix cannot pile onto one replica.
    # 4, not 2: with only first-token waits counted, 2 spilled hot prefixes onto cold replicas often enough
    # to put prefill misses into p99 (docs/benchmarks.md, the imbalance bound).
    pool_max_imbalance: float = Field(4.0, ge=1.0)
    # Prompt characters per hashed block of the prefix index, and blocks the index remembers.
    pool_prefix_block_chars: int = Field(256, gt=0)
    pool_prefix_index_blocks: int = Field(65536, gt=0)
    # How many prompt characters one replica's prefix cache holds (about 4 per token: vLLM's
    # num_gpu_blocks x block_size tokens, less what running sequences take); past it the index
    # takes the replica's least recently served blocks as evicted. 0: unknown, learned instead
    # from the engine's answers (vLLM's usage.prompt_tokens_details.cached_tokens; where the
    # engine does not report it, as llama.cpp's server and Triton, nothing is evicted).
    pool_prefix_replica_cache_chars: int = Field(0, ge=0)
    # Requests waiting in a replica's queue beyond which it counts as saturated; when every
    # replica is, requests get 503 with Retry-After at once. 0: never.
    pool_max_queue: int = Field(64, ge=0)
    # A replica that failed (refused, cut before the first byte, not ready) is left out this
    # long, doubling on each further failure up to the max, then probed back.
    pool_eject_seconds: float = Field(1.0, gt=0)
    pool_eject_max_seconds: float = Field(30.0, gt=0)
    # Tries per request on distinct replicas before a failure reaches the client.
    pool_max_attempts: int = Field(3, ge=1)
    # Several backend replicas of one model (the chart's replicaCount > 1): a Redis URL
    # (redis://host:6379/0) over which they share their picks, so every one's prefix index and
    # session map hold all of theirs and they place each prefix alike (modelplex_kit.pools.sync).
    # Empty: each backend replica learns from its own requests only (right for one).
    pool_sync_url: str = ""
    # The pub/sub channel; empty: modelplex:pool:<the backend's modality>. Picks for engine replicas a
    # backend does not know are ignored, so sharing a channel across models costs only bandwidth.
    pool_sync_channel: str = ""
    # Engines that publish their KV-cache events (vLLM's --kv-events-config, ZMQ): the port of each
    # replica's publisher (vLLM's endpoint tcp://*:5557), on the replica's host. Every backend replica
    # subscribes to every engine replica and keeps the same exact view of what each caches
    # (modelplex_kit.pools.kv_events); a prompt this backend's prefix index knows nothing of is
    # tokenized by an engine (/tokenize) and placed where the events say its prefix is. 0: off.
    pool_kv_events_port: int = Field(0, ge=0, le=65535)
    # How long a prompt's tokenizing (the engine's /tokenize, for that lookup) may hold its pick; past it
    # the request is placed without the events.
    pool_tokenize_timeout_seconds: float = Field(0.25, gt=0)
    # The publisher's topic (vLLM's kv-events-config "topic"), empty: every batch.
    pool_kv_events_topic: str = ""
    # Blocks remembered per engine replica (its KV cache's block count is enough; the oldest stored go
    # first), about 400 bytes each.
    pool_kv_events_max_blocks: int = Field(262144, gt=0)
    # LoRA adapters one replica holds at once (modelplex_kit.pools.adapters); past it, the least recently
    # used idle one is unloaded before another is loaded. With vLLM: its --max-loras less one (a vLLM
    # defect runs base-model requests under the adapter in the last slot once every slot is filled). 0: no
    # bound (the engine's own).
    pool_adapter_slots: int = Field(3, ge=0)
    # How long a request for an adapter may wait for a replica's slot to free (every slot running): then 503.
    pool_adapter_wait_seconds: float = Field(30.0, gt=0)
    # Scale to zero (a catalog entry's scale_to_zero and cold_start_timeout): a request that finds no replica
    # ready is held up to this long for one to start, its demand reported at once (pool_demand_target), and
    # sent to the first replica that is ready; past it, 503 with Retry-After. Streams announce that they are
    # held (modelplex_kit.cold_start), so the edge keeps their connections alive meanwhile. 0: a pool with no
    # ready replica answers 503 at once (a model that never scales to zero).
    pool_cold_start_timeout_seconds: float = Field(0.0, ge=0)
    # While requests are held, each replica not ready is asked this often whether it is now (its readiness
    # check: two small GETs on an OpenAI server, one gRPC call on Triton): the cold start's added latency.
    pool_cold_probe_seconds: float = Field(0.02, gt=0)
    # Requests held at once; beyond it, 503 with Retry-After at once (bounded memory during a cold start).
    pool_max_held: int = Field(1024, ge=1)
    # The scaler's gRPC address (the catalog's DemandService, which KEDA's external scaler reads), and the
    # key this pool's demand is reported under (the catalog model id; empty: the pool's name). Empty
    # target: no reports.
    pool_demand_target: str = ""
    pool_demand_key: str = ""
    # How often demand is reported besides at once when a request is held (a report lapses after 3 of these).
    pool_demand_interval_seconds: float = Field(2.0, gt=0)
