from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from modelplex_kit.objectstore.settings import ObjectStoreSettings
from modelplex_kit.settings import ServiceSettings


class EdgeSettings(ServiceSettings, ObjectStoreSettings):
    """Edge settings (env prefix ``MODELPLEX_EDGE_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_EDGE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    catalog_target: str = "127.0.0.1:50051"
    # The one accepted API key when no gatekeeper is configured (gatekeeper_target empty). Never logged.
    dev_api_key: SecretStr = Field(
        SecretStr("sk-modelplex-dev"),
        validation_alias=AliasChoices("MODELPLEX_DEV_API_KEY", "MODELPLEX_EDGE_DEV_API_KEY"),
    )
    # The gatekeeper sidecar (unix:///run/modelplex/gatekeeper.sock, or host:port). Empty: only the
    # dev key above is accepted, without limits.
    gatekeeper_target: str = ""
    # Longest wait for the gatekeeper's decision; past it the request gets 503 + Retry-After.
    gatekeeper_timeout_seconds: float = 2.0
    # Admit most requests in-process from quota leases the sidecar grants (exact limits either way).
    gatekeeper_leases: bool = True
    # While the sidecar is unreachable: "closed" refuses (503 + Retry-After) once a key's lease has
    # expired (within one lease period); "open" keeps serving keys that held a lease, at its size.
    gatekeeper_failure: Literal["open", "closed"] = "closed"
    # While a dependency is down (the gatekeeper sidecar, the catalog, the batch queue) its outage is
    # logged once, then summarised at most this often (requests refused, retries), then once when it is back.
    outage_summary_seconds: float = Field(60.0, gt=0)
    # Browser origins allowed by CORS; empty keeps CORS closed (a server-to-server API).
    # Comma-separated in the environment, as the Helm chart writes it.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = 16 * 1024 * 1024
    # How much structure a JSON body may hold (outside strings, a comma or colon weighs 1, a bracket or
    # brace 4), so that no body holds the event loop long while it is parsed: a 413 beyond it
    # (modelplex_edge.json_budget). 0: no limit.
    max_json_weight: int = Field(300_000, ge=0)
    # Body limit of the file-upload endpoints (/v1/audio/transcriptions, /translations): OpenAI's 25 MB
    # file plus the form around it. The file itself is held to 25 MB (413) by the endpoint.
    max_upload_bytes: int = 26 * 1024 * 1024
    # Longest wait for the next piece of a request body, and for a request's headers; a slower
    # client gets 408 and its connection is closed.
    body_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 30.0
    # Longest time for a whole request body, from its first read: a body trickled a byte every few
    # seconds (each gap within the timeout above) is cut with 408 here. 300 s lets a 26 MB upload
    # through at 0.7 Mbit/s.
    body_deadline_seconds: float = 300.0
    # Deadline for one backend call (generation included, and a cold start's hold: keep it above the
    # catalog's cold_start_timeout of any model that scales to zero).
    backend_timeout_seconds: float = 600.0
    # A stream held for its model's cold start (chat, completions, responses) is answered 200 at once and
    # sent an SSE comment this often until its first chunk, so no proxy or client idles it out.
    stream_keepalive_seconds: float = Field(5.0, gt=0)
    # How long startup waits for the first catalog snapshot before serving 503s.
    catalog_wait_seconds: float = 10.0
    # uvicorn's keep-alive for idle client connections.
    keep_alive_seconds: int = 75
    # The scaler that demand for the jobs process is reported to (modelplex_kit.demand; the catalog's gRPC
    # address), under the key "jobs": queued jobs, reported at once after each enqueue, so a jobs process
    # scaled to zero starts. Empty: nothing is reported.
    demand_target: str = ""

    # -- stored responses (/v1/responses with store: true)
    # memory: this process only (tests); sqlite: one edge, survives restarts (`make run`);
    # redis: every edge replica sees every response (continue on any replica).
    responses_store: Literal["memory", "sqlite", "redis"] = "memory"
    responses_sqlite_path: str = ".modelplex/responses.sqlite3"
    responses_redis_url: str = ""
    # How long a stored response (and so a conversation) can be retrieved or continued; OpenAI keeps 30 days.
    responses_retention_seconds: int = Field(30 * 24 * 3600, ge=1)
    # The memory store's bound: beyond it the oldest responses are forgotten first.
    responses_memory_max_records: int = Field(10_000, ge=1)
    # Bounds on a previous_response_id chain: responses in it, and the tokens of its last turn.
    responses_max_chain_depth: int = Field(100, ge=1)
    responses_max_chain_tokens: int = Field(1_000_000, ge=1)
    # -- background responses (background: true): a durable queue beside the response store (SQLite file
    # next to responses_sqlite_path; the same Redis; in memory for the memory store). The edge queues them; the
    # jobs process (python -m modelplex_edge.jobs, which reads these settings too) runs them.
    # Background responses the jobs process runs at once (0: none).
    responses_background_workers: int = Field(4, ge=0)
    # Queued background responses beyond these are a 429.
    responses_background_max_queue: int = Field(256, ge=1)
    responses_background_max_queue_per_project: int = Field(64, ge=1)
    # A worker that stops renewing its claim this long is presumed dead (its process was killed): another runs
    # it (an idle worker claims at least every quarter lease to find such work).
    responses_background_lease_seconds: float = Field(10.0, gt=0)
    # Idle workers look at the queue's depth this often (one indexed count, or one Redis round trip) and claim
    # when something is queued: a queued response starts within about this long.
    responses_background_poll_seconds: float = Field(0.25, gt=0)
    # How often a running worker renews its claim, and so notices a cancel; resumed streams read the store
    # this often.
    responses_background_renew_seconds: float = Field(0.25, gt=0)
    # Events of one background response kept for resuming streams; beyond it deltas are not kept (the
    # closing events always are, so a resumed stream still ends with the full response).
    responses_background_max_events: int = Field(20_000, ge=10)
    # How often a running background response's progress is written to the store.
    responses_background_flush_seconds: float = Field(0.1, gt=0)

    # -- files and batches (/v1/files, /v1/batches)
    # Uploaded files and batch parts and results live in the object store (OBJECT_STORE*: local or s3, see
    # modelplex_kit.objectstore.settings); this is the local store's directory when OBJECT_STORE_DIR is unset
    # (several replicas: a shared volume, or s3).
    object_dir: str = ".modelplex/objects"
    # An uploaded file's limit: OpenAI's for batch input files (200 MB). Larger uploads get 413.
    files_max_bytes: int = Field(200 * 1000 * 1000, ge=1)
    # Files of purpose batch expire this long after upload unless expires_after says otherwise (OpenAI: 30 days).
    files_default_expiry_seconds: int = Field(30 * 24 * 3600, ge=3600)
    # Where batch jobs are queued (modelplex_kit.jobqueue): memory (one process; tests), sqlite (the edge and
    # the jobs process on one host, survives restarts: `make run`), redis (every replica).
    batches_store: Literal["memory", "sqlite", "redis"] = "memory"
    batches_sqlite_path: str = ".modelplex/batches.sqlite3"
    batches_redis_url: str = ""
    # Batches the jobs process runs at once (0: none), and lines of one batch in flight at once. Lines are
    # marked x-modelplex-priority: batch; the backends' schedulers serve interactive work first.
    batches_workers: int = Field(1, ge=0)
    batches_line_concurrency: int = Field(4, ge=1)
    # Lines run between two durable checkpoints (a part object): a killed worker re-runs at most these.
    batches_chunk_lines: int = Field(16, ge=1)
    # OpenAI's limits: lines per input file; queued batches per project beyond max_queue are a 429.
    batches_max_lines: int = Field(50_000, ge=1)
    batches_max_queue: int = Field(256, ge=1)
    # Estimated tokens (input bytes / 4) of a project's unfinished batches; a batch beyond it is a 429 at creation.
    batches_max_enqueued_tokens: int = Field(20_000_000, ge=1)
    # Lease of a running batch (a worker silent this long is presumed dead) and how often it is renewed (and
    # a cancel noticed); idle workers look at the queue's depth this often (and claim at least every quarter
    # lease, to find a dead worker's batch).
    batches_lease_seconds: float = Field(10.0, gt=0)
    batches_renew_seconds: float = Field(0.5, gt=0)
    batches_poll_seconds: float = Field(0.25, gt=0)
    # The completion window: what is not done this long after creation is expired (OpenAI's only one: 24h).
    batches_window_seconds: int = Field(24 * 3600, ge=1)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value
