"""cluster.yaml: the schema of a pd cluster, validated by pydantic.

Every key is documented here (``pd-serve --help`` prints the same reference) and
every mistake is reported as ``<key.path>: <what is wrong>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pd.cluster import kv_events
from pd.registry import FLOWS, ROUTING_POLICIES, transport_choices
from pd.routing_settings import KVAwareSettings, kv_aware_default
from pd.store.config import StoreConfig
from pd.transfer.config import connector_default

# `vllm serve` arguments pd sets itself for every instance.
RESERVED_ENGINE_ARGS = {"model", "host", "port", "kv_transfer_config", "served_model_name"}


class ConfigError(ValueError):
    """cluster.yaml cannot be used; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    preset: str | None = None
    """A model pd generates locally (``tiny`` or ``small``): no download."""
    path: str | None = None
    """A local model folder or a model hub id, as ``vllm serve`` takes it."""
    served_name: str | None = None
    """The model name clients use (default: the preset's or path's name)."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset or model.path")
        if self.preset is not None:
            from pd.models import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"model.preset must be one of {sorted(PRESETS)}")
        return self


class Resources(_Strict):
    cpus: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """Ray CPUs reserved per instance. ``auto``: 1, except on a local cluster whose
    machine has fewer CPUs than that: then every ``auto`` instance gets an equal share
    of the CPUs the explicit values leave (fractional, e.g. 0.66 for 3 instances on 2)."""
    gpus: Annotated[int, Field(ge=0)] = 0
    """GPUs per instance; more than one sets vLLM's tensor-parallel size to match."""
    cpu_cores: str | None = "auto"
    """CPU machines: cores vLLM's threads bind to, e.g. ``"0-3"``; ``auto`` gives each
    instance its own cores; null leaves binding to vLLM."""
    cpu_kv_cache_gib: Annotated[float, Field(gt=0)] = 1
    """CPU machines: KV cache size per instance in GiB (VLLM_CPU_KVCACHE_SPACE); fractions
    too (0.05: ~50 MiB, for testing reuse and eviction), passed as vLLM's
    ``--kv-cache-memory-bytes``. It must hold one ``max_model_len`` request."""
    niceness: Annotated[int, Field(ge=-20, le=19)] = 0
    """CPU priority of the instance's vLLM processes (Linux nice, -20..19; 0 normal).
    Ray starts its workers at 15; pd sets this instead. A value below the Ray worker's
    needs CAP_SYS_NICE (pd-serve warns where it is missing)."""


class Placement(_Strict):
    """Which nodes of a joined Ray cluster hold this role's instances (docs/multi-node.md).
    Empty: any node with room."""

    labels: dict[str, str] = Field(default_factory=dict)
    """Ray node labels the node must have, every one (``ray start --labels key=value``),
    e.g. ``{pd-host: host-1}``."""
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """Custom Ray resources each instance takes (``ray start --resources '{"name": 1}'``):
    only nodes that have them hold it, e.g. ``{prefill-node: 1}``."""

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(value))
        if builtin:
            raise ValueError(f"{builtin} are set by resources.cpus/gpus; name custom ones here")
        return value

    @field_validator("labels")
    @classmethod
    def _named(cls, value: dict[str, str]) -> dict[str, str]:
        if any(not key.strip() for key in value):
            raise ValueError("a label needs a name")
        return value

    def __bool__(self) -> bool:
        return bool(self.labels or self.resources)


class RoleSpec(_Strict):
    instances: Annotated[int, Field(ge=1, le=64)] = 1
    """Number of vLLM instances of this role."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """``vllm serve`` arguments for this role only (override the common ones)."""
    resources: Resources = Field(default_factory=Resources)
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for this role's vLLM processes."""
    placement: Placement = Field(default_factory=Placement)
    """A joined cluster (``ray.address``): the nodes this role's instances run on."""

    @field_validator("engine_args")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_engine_args(value)


class KVAwareSpec(_Strict):
    """``routing: kv_aware`` settings (docs/routing.md); the defaults are the policy's
    own (``pd.routing_settings.KVAwareSettings``)."""

    queued_token_weight: float = kv_aware_default("queued_token_weight")
    """Prefill cost: weight of a prompt token already queued on an instance, against
    one token this request would compute there (its prompt minus the prefix held)."""
    decode_affinity_slack: int = kv_aware_default("decode_affinity_slack")
    """Decode: the instance holding the longest prefix wins while it has at most this
    many requests in flight more than the least loaded one."""
    decode_only_cached_fraction: float | None = kv_aware_default("decode_only_cached_fraction")
    """No prefill leg when the chosen decode instance holds at least this fraction of
    the prompt (null: never for this reason)."""
    decode_only_max_uncached_tokens: int = kv_aware_default("decode_only_max_uncached_tokens")
    """No prefill leg when the decode instance would compute at most this many prompt
    tokens itself (0: never for this reason)."""
    decode_only_token_weight: float | None = kv_aware_default("decode_only_token_weight")
    """No prefill leg when this many times the tokens decode would compute costs no
    more than the best prefill instance's estimate (null: never for this reason)."""
    expected_block_ttl_s: float = kv_aware_default("expected_block_ttl_s")
    """Seconds a just-routed prompt's blocks count as held where they will be computed,
    before that instance's KV events say so (0: only what the events say)."""
    max_blocks_per_instance: int = kv_aware_default("max_blocks_per_instance")
    """Memory bound of the proxy's KV index: block hashes remembered per instance."""
    replay_timeout_s: float = kv_aware_default("replay_timeout_s")
    """How long the proxy waits for an instance to replay KV events it missed."""
    events_port: Annotated[int, Field(ge=1, le=65533)] = 5557
    """Joined Ray clusters: first TCP port of the instances' KV event sockets (two per
    instance, numbered across the cluster). A local cluster uses ipc sockets in /tmp."""

    @model_validator(mode="after")
    def _valid(self) -> KVAwareSpec:
        self.settings()
        return self

    def settings(self) -> KVAwareSettings:
        return KVAwareSettings(**self.model_dump(exclude={"events_port"}))


class ProxySpec(_Strict):
    host: str = "127.0.0.1"
    """Address the proxy listens on (loopback unless you open it on purpose)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    """Port of the OpenAI-compatible API."""
    routing: str = "round_robin"
    """``round_robin``; ``least_loaded`` (prefill by outstanding prompt tokens, decode
    by outstanding requests); ``kv_aware`` (by where the prompt's prefix is cached, from
    the instances' KV events, and load; may leave prefill out: docs/routing.md)."""
    kv_aware: KVAwareSpec = Field(default_factory=KVAwareSpec)
    """Settings of ``routing: kv_aware``."""
    flow: str = "first-token"
    """``first-token``: prefill leg first, then decode with its KV's address; a streamed
    request's first token is the prefill leg's, sent at once, and decode continues from
    it (see the README for which requests).
    ``sequential``: the same legs; decode computes the first token again.
    ``concurrent``: both legs at once; decode waits for the KV (hides the second hop,
    but the waiting decode instance keeps stepping: see the README)."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    """Largest request body accepted, in bytes (declared or streamed); larger: 413."""
    max_n: Annotated[int, Field(ge=1)] = 16
    """Largest ``n`` (choices per request) accepted; larger: 400."""
    api_key: Annotated[str, Field(min_length=1)] | None = Field(default=None, repr=False)
    """If set, every /v1/* request must send ``Authorization: Bearer <key>`` (else 401);
    /health and /metrics stay open. Prefer api_key_env: it keeps the key out of the file."""
    api_key_env: Annotated[str, Field(min_length=1)] | None = None
    """Name of an environment variable holding the API key, read at start-up (it must be
    set and non-empty then), e.g. ``PD_API_KEY``. Exclusive with api_key."""

    @field_validator("routing")
    @classmethod
    def _known_routing(cls, name: str) -> str:
        return ROUTING_POLICIES.check(name)

    @field_validator("flow")
    @classmethod
    def _known_flow(cls, name: str) -> str:
        return FLOWS.check(name)

    @field_validator("api_key_env")
    @classmethod
    def _env_set(cls, name: str | None) -> str | None:
        if name is not None and not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set (or empty)")
        return name

    @model_validator(mode="after")
    def _one_key_source(self) -> ProxySpec:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give at most one of proxy.api_key and proxy.api_key_env")
        return self

    def resolved_api_key(self) -> str | None:
        """The key clients must send, or None when the API is open."""
        if self.api_key_env is not None:
            return os.environ[self.api_key_env]
        return self.api_key


class ConnectorSpec(_Strict):
    """pd connector settings (kv_connector_extra_config); see the README. The defaults
    are the connector's own (``pd.transfer.config.PDConnectorConfig``)."""

    lease_timeout_s: Annotated[float, Field(gt=0)] = connector_default("lease_timeout_s")
    """Prefill: KV held for decode is freed after this long if never claimed."""
    transfer_timeout_s: Annotated[float, Field(gt=0)] = connector_default("transfer_timeout_s")
    """Decode: deadline of one request's KV load; past it, decode recomputes."""
    handshake_timeout_s: Annotated[float, Field(gt=0)] = connector_default("handshake_timeout_s")
    """Decode: deadline of the first contact with a prefill instance; also the longest
    silence from it a request waiting for its prefill tolerates."""
    max_concurrent_transfers: Annotated[int, Field(ge=1)] = connector_default(
        "max_concurrent_transfers"
    )
    """Decode: KV loads running at once."""
    rendezvous_timeout_s: Annotated[float, Field(gt=0)] = connector_default("rendezvous_timeout_s")
    """Decode (concurrent flow): how long a request waits for its prefill instance to
    finish the prompt before decode recomputes it."""


class Timeouts(_Strict):
    startup_s: Annotated[float, Field(gt=0)] = 900
    """How long every instance may take to become healthy."""
    request_s: Annotated[float, Field(gt=0)] = 600
    """Proxy: the longest a request may take end to end."""
    drain_s: Annotated[float, Field(ge=0)] = 30
    """Shutdown: how long in-flight requests may finish."""
    health_interval_s: Annotated[float, Field(gt=0)] = 2
    """Proxy: how often every instance's /health is checked."""
    health_misses: Annotated[int, Field(ge=1)] = 2
    """Proxy: health checks in a row an instance may leave unanswered (connected, but
    no answer within 2 s: stopped, or starved of CPU) before it leaves the rotation.
    One that refuses connections or answers with an error leaves at once."""


class RaySpec(_Strict):
    address: str | None = None
    """Join this Ray cluster (``auto``, ``host:port``, ``ray://...``); null starts a local one."""
    namespace: str = "pd"
    """Ray namespace of the instance actors (pd-prefill-0, pd-decode-0, ...)."""
    dashboard_host: str = "127.0.0.1"
    """Local cluster only: address of the Ray dashboard."""
    dashboard_port: Annotated[int, Field(ge=1, le=65535)] = 8265
    """Local cluster only: port of the Ray dashboard."""
    max_restarts: Annotated[int, Field(ge=0)] = 3
    """How often a crashed instance actor is restarted before it is given up."""


class ClusterConfig(_Strict):
    model: ModelSpec
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """``vllm serve`` arguments for every instance, as ``key: value`` (``flag: true``)."""
    prefill: RoleSpec = Field(default_factory=RoleSpec)
    decode: RoleSpec = Field(default_factory=RoleSpec)
    transport: str = connector_default("transport")
    """KV transport: ``zmq`` (TCP), ``nixl``, or ``auto`` (the best available)."""
    connector: ConnectorSpec = Field(default_factory=ConnectorSpec)
    store: dict[str, Any] | None = None
    """The node's KV store (``pd.store.config.StoreConfig`` keys: ``host_gib``,
    ``disk_path``, ``disk_gib``, ``save_decode``, ...), passed to every instance's
    connector; absent: no store."""
    proxy: ProxySpec = Field(default_factory=ProxySpec)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, name: str) -> str:
        if name not in transport_choices():
            raise ValueError(f"unknown transport {name!r}; choose one of {transport_choices()}")
        return name

    @field_validator("engine_args")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_engine_args(value)

    @model_validator(mode="after")
    def _placement_needs_cluster(self) -> ClusterConfig:
        for role in ("prefill", "decode"):
            if getattr(self, role).placement and self.ray.address is None:
                raise ValueError(
                    f"{role}.placement: a local cluster is one node without these labels or "
                    "resources; set ray.address to join a cluster (docs/multi-node.md)"
                )
        return self

    @field_validator("store")
    @classmethod
    def _valid_store(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            store = StoreConfig.from_dict(value)
        except ValueError as e:
            raise ValueError(f"store.{e}") from None
        # Instances may start in another directory: pass the disk tier's path absolute.
        return {**value, "disk_path": store.disk_path} if store.disk_path else dict(value)

    @model_validator(mode="after")
    def _kv_aware_fits(self) -> ClusterConfig:
        if self.proxy.routing == "kv_aware":
            roles = {r: (s.engine_args, s.env) for r, s in (("prefill", self.prefill),
                                                             ("decode", self.decode))}  # fmt: skip
            kv_events.check(self.engine_args, roles)
        return self

    @property
    def served_model_name(self) -> str:
        if self.model.served_name:
            return self.model.served_name
        if self.model.preset:
            return f"pd-{self.model.preset}"
        return str(self.model.path)


def _check_engine_args(value: dict[str, Any]) -> dict[str, Any]:
    normalized = {key.replace("-", "_"): v for key, v in value.items()}
    reserved = sorted(RESERVED_ENGINE_ARGS & set(normalized))
    if reserved:
        raise ValueError(f"{reserved} are set by pd itself; remove them")
    return normalized


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """Read and validate cluster.yaml; raise ``ConfigError`` with one readable message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + format_validation_error(e)) from None


def format_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
