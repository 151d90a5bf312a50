"""FLEET.toml: the gateway's settings and its backends, validated; a bad key or value is a `ConfigError` naming it.

```toml
[gateway]
policy = "least_outstanding"   # round_robin, least_outstanding, latency, cost, prefix, session
health_interval_s = 0.5

[[backend]]
name = "eu-a"
url = "http://127.0.0.1:8001"
model = "tiny"                 # the model name clients ask for; several backends may serve one model
tier = "cloud"                 # or "edge"
region = "eu"
cost_per_mtok_in = 0.5
cost_per_mtok_out = 1.5
max_concurrency = 64           # optional

[cache]                        # optional: the semantic cache (pip install 'aiinfra[cache]')
enabled = true
target_false_hit_rate = 0.01   # the one knob: the share of hits allowed to answer a different question
path = "cache.sqlite"          # survives restarts (empty: memory only)
redis_url = "redis://127.0.0.1:6379/0"   # optional: entries shared by every gateway on this Redis

[[cascade]]                    # optional: a virtual model over a small and a large pool (docs/cascade.md)
model = "auto"                 # what clients ask for
small = "tiny-edge"            # the model of the small pool's [[backend]] entries
large = "tiny-cloud"           # the model of the large pool's
mode = "generate"              # or "prompt": decide from the small model's likelihood of the prompt alone
threshold = 0.35               # a score at or above this keeps the small model (`aiinfra route calibrate` sets it)
quantile = 0.1                 # the quantile of per-token probabilities that scores (0: the least likely token)
router = "threshold"           # or "learned": weights, bias, feature_means, feature_scales from
                               # `aiinfra route calibrate --router learned` (docs/cascade.md)
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from aiinfra.config import ConfigError, read_toml
from aiinfra.route.cascade import MODE_FEATURES, LearnedRouter

POLICIES = ("round_robin", "least_outstanding", "latency", "cost", "prefix", "session")
SCORERS = ("prefix", "queue", "kv", "latency", "cost")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutlierConfig(Section):
    """Passive outlier detection, as Envoy's: consecutive failures eject a backend for a growing cooldown."""

    consecutive_failures: int = Field(5, ge=1, description="failures in a row (5xx, resets, timeouts) that eject")
    base_ejection_s: float = Field(30.0, gt=0, description="first ejection's length; the n-th lasts n times this")
    max_ejection_s: float = Field(300.0, gt=0, description="no ejection lasts longer than this")
    max_ejected_fraction: float = Field(
        0.5, gt=0, le=1, description="share of a pool that may be ejected at once (at least one backend)")


class GatewayConfig(Section):
    """How the gateway picks a backend and how it survives failures."""

    policy: Literal["round_robin", "least_outstanding", "latency", "cost", "prefix", "session"] = Field(
        "least_outstanding", description="routing policy: " + ", ".join(POLICIES))
    weights: dict[str, float] = Field(
        default_factory=dict, description="scorer weights overriding the policy's, e.g. {prefix = 3, queue = 2}")
    health_interval_s: float = Field(0.5, gt=0, description="seconds between active health checks of a backend")
    health_timeout_s: float = Field(1.0, gt=0, description="a health check slower than this fails")
    connect_timeout_s: float = Field(2.0, gt=0, description="time to open a connection to a backend")
    request_timeout_s: float = Field(600.0, gt=0, description="a client request's whole time limit")
    max_retries: int = Field(2, ge=0, description="further backends tried for a request (before or mid-stream)")
    retry_budget_ratio: float = Field(
        0.2, ge=0, le=1, description="retries in flight at most this share of requests in flight (Envoy's budget)")
    min_retry_concurrency: int = Field(3, ge=0, description="retries always allowed in flight, whatever the budget")
    hedge: bool = Field(False, description="send a second copy when the first has not answered by the pool's p95")
    hedge_quantile: float = Field(0.95, gt=0, lt=1, description="the TTFT quantile after which a request hedges")
    hedge_min_delay_ms: float = Field(5.0, ge=0, description="never hedge sooner than this")
    hedge_budget_ratio: float = Field(0.05, ge=0, le=1, description="hedges at most this share of requests")
    latency_slo_ms: float = Field(
        2000.0, gt=0, description="the cost policy's limit on predicted latency (TTFT + TPOT x max_tokens)")
    region: str = Field("", description="preferred region (header x-aiinfra-region overrides); others take spill")
    session_header: str = Field("x-session-id", description="header naming a session (else the body's `user`)")
    prefix_block_chars: int = Field(128, ge=8, description="prompt characters per block of the prefix index")
    prefix_blocks_per_backend: int = Field(100_000, ge=1, description="blocks remembered per backend (LRU)")
    load_cap_eps: float = Field(
        0.25, ge=0, description="prefix policy: no backend takes more than (1 + eps) x the mean load")
    api_keys: list[SecretStr] = Field(default_factory=list, description="client keys (empty: no key needed)")
    api_keys_env: str = Field("", description="environment variable holding more client keys, comma-separated")
    max_body_bytes: int = Field(4 << 20, ge=1, description="largest request body accepted")
    outlier: OutlierConfig = Field(default_factory=OutlierConfig, description="outlier detection")

    @field_validator("weights")
    @classmethod
    def _known_scorers(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {', '.join(unknown)}: expected {', '.join(SCORERS)}")
        if any(weight < 0 for weight in weights.values()):
            raise ValueError("weights must be >= 0")
        return weights

    def client_keys(self) -> list[str]:
        """Every key a client may present: the listed ones and those in `api_keys_env`."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_keys_env:
            keys += [key.strip() for key in os.environ.get(self.api_keys_env, "").split(",") if key.strip()]
        return keys


class CacheConfig(Section):
    """The semantic cache: answers to temperature-0 requests, reused for the same question asked again."""

    enabled: bool = Field(False, description="look up and store answers (needs the `cache` extra)")
    target_false_hit_rate: float = Field(
        0.01, gt=0, lt=0.5, description="the one knob: the share of hits that may answer a different question")
    ttl_s: float = Field(86_400.0, gt=0, description="an entry's lifetime from its store (a hit does not extend it)")
    max_bytes: int = Field(256 << 20, ge=1 << 16, description="entries' bytes kept at most; the least recently "
                           "used go first")
    path: str = Field("", description="SQLite file the entries survive restarts in (empty: memory only)")
    redis_url: str = Field("", description="Redis shared by several gateways, e.g. redis://127.0.0.1:6379/0")
    redis_prefix: str = Field("aiinfra:cache", min_length=1, description="prefix of every Redis key written")
    all_temperatures: bool = Field(
        False, description="cache sampled requests too (else only temperature 0, or a request's "
        "'x-aiinfra-cache: use' header)")
    speculative: bool = Field(
        True, description="send a request to a backend while its lookup runs, cancelled on a hit: a miss then "
        "waits for no embedding")
    speculative_after_ms: float = Field(
        4.0, ge=0, le=1000, description="how long a speculative lookup runs before its request is sent to a "
        "backend: a hit found sooner costs no backend work, and a miss waits at most this long (0: send at once)")
    per_tenant: bool = Field(False, description="partition entries by the client's API key")
    admin_key_env: str = Field("", description="environment variable holding the key of /admin/cache/invalidate "
                               "(unset: any client key, or none when the gateway has none)")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r}: expected redis://HOST:PORT/DB")
        return url


class CascadeConfig(Section):
    """A virtual model: each request goes to the small pool when its confidence score clears `threshold`, else to
    the large pool (docs/cascade.md)."""

    model: str = Field(min_length=1, description="the virtual model name clients ask for, e.g. auto")
    small: str = Field(min_length=1, description="the `model` of the small pool's [[backend]] entries")
    large: str = Field(min_length=1, description="the `model` of the large pool's [[backend]] entries")
    mode: Literal["generate", "prompt"] = Field(
        "generate", description="generate: answer on the small pool, score its tokens, escalate below the threshold; "
        "prompt: score the prompt on the small pool (one prefill-only request) and send the request to one pool")
    threshold: float = Field(
        ge=0, le=1, description="a score (a probability in [0, 1]) at or above this keeps the small model; "
        "`aiinfra route calibrate` picks it for a target")
    statistic: Literal["quantile", "mean"] = Field(
        "quantile", description="quantile: the `quantile` of the per-token probabilities (Gupta et al. 2024, no "
        "length bias); mean: their geometric mean, exp(mean log-probability)")
    quantile: float = Field(0.1, ge=0, le=1, description="which quantile scores (0: the least likely token, 0.5: "
                            "the median)")
    router: Literal["threshold", "learned"] = Field(
        "threshold", description="threshold: the `statistic` is the score; learned: a linear model of the large "
        "model's gain from the mode's features (`aiinfra route calibrate --router learned` writes the keys below)")
    weights: dict[str, float] = Field(default_factory=dict, description="learned: each feature's weight (of its "
                                      "standardised value) in the predicted gain")
    bias: float = Field(0.0, description="learned: the predicted gain (standardised) at the features' means")
    feature_means: dict[str, float] = Field(default_factory=dict, description="learned: each feature's mean on "
                                            "the prompts it was fitted on")
    feature_scales: dict[str, float] = Field(default_factory=dict, description="learned: each feature's standard "
                                             "deviation there (> 0)")

    @model_validator(mode="after")
    def _learned_keys(self) -> CascadeConfig:
        learned_keys = ("weights", "feature_means", "feature_scales")
        if self.router == "threshold":
            given = [key for key in (*learned_keys, "bias") if key in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only for router = \"learned\" (this cascade's router is "
                                 "threshold)")
            return self
        names = MODE_FEATURES[self.mode]
        if not self.weights:
            raise ValueError('router = "learned" needs weights = {feature = weight, ...} (from `aiinfra route '
                             f"calibrate --router learned`); features of mode {self.mode}: {', '.join(names)}")
        for key in learned_keys:
            unknown = sorted(set(getattr(self, key)) - set(names))
            if unknown:
                raise ValueError(f"{key}: unknown feature {', '.join(unknown)} for mode {self.mode}; expected some "
                                 f"of {', '.join(names)}")
        for key in ("feature_means", "feature_scales"):
            missing = sorted(set(self.weights) - set(getattr(self, key)))
            if missing:
                raise ValueError(f"{key}: missing {', '.join(missing)} (every weighted feature needs its mean and "
                                 "scale)")
        bad = sorted(name for name in self.weights if not self.feature_scales[name] > 0)
        if bad:
            raise ValueError(f"feature_scales: {', '.join(bad)} must be > 0")
        return self

    def learned_router(self) -> LearnedRouter | None:
        """The learned router this table describes; None for the threshold router."""
        if self.router != "learned":
            return None
        return LearnedRouter(dict(self.weights), self.bias, {name: self.feature_means[name] for name in self.weights},
                             {name: self.feature_scales[name] for name in self.weights})

    @property
    def feature_prefix(self) -> str:
        """Which run of tokens the mode's features describe: the answer's or the prompt's."""
        return "answer" if self.mode == "generate" else "prompt"


class BackendConfig(Section):
    """One OpenAI-compatible server (ours, vLLM, anything) serving one model."""

    name: str = Field(min_length=1, description="unique name, used in metrics and logs")
    url: str = Field(description="server root, e.g. http://127.0.0.1:8001 (the /v1/... paths are added)")
    model: str = Field(min_length=1, description="the model name clients ask for")
    served_model: str = Field("", description="the name the backend itself knows the model by (default: model)")
    tier: Literal["cloud", "edge"] = Field("cloud", description="cloud or edge")
    region: str = Field("", description="where it runs, for region preference")
    cost_per_mtok_in: float = Field(0.0, ge=0, description="price per million prompt tokens")
    cost_per_mtok_out: float = Field(0.0, ge=0, description="price per million generated tokens")
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight at most (default: no cap)")
    api_key: SecretStr | None = Field(None, description="key sent to the backend (never logged or echoed)")
    api_key_env: str = Field("", description="environment variable holding the backend's key")
    health_path: str = Field("/health", description="the path of its health check (200 means healthy)")
    server: Literal["auto", "aiinfra", "openai"] = Field(
        "auto", description="aiinfra servers continue a cut stream exactly; auto asks /v1/models")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
            raise ValueError(f"{url!r}: expected http://HOST:PORT or https://HOST:PORT")
        return url.rstrip("/")

    def key(self) -> str | None:
        """The key to send, from the file or the environment."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @property
    def backend_model(self) -> str:
        return self.served_model or self.model


class FleetConfig(Section):
    """The whole file: one [gateway] table, optional [cache] and [[cascade]] tables, one [[backend]] per server."""

    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="gateway settings")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="the semantic cache")
    backend: list[BackendConfig] = Field(min_length=1, description="the servers")
    cascade: list[CascadeConfig] = Field(default_factory=list, description="virtual models over a small and a "
                                         "large pool")

    @model_validator(mode="after")
    def _unique_names(self) -> FleetConfig:
        names = [backend.name for backend in self.backend]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _cascades_over_pools(self) -> FleetConfig:
        models = sorted({backend.model for backend in self.backend})
        seen: set[str] = set()
        for index, cascade in enumerate(self.cascade):
            where = f"cascade[{index}] ({cascade.model})"
            if cascade.model in models:
                raise ValueError(f"{where}.model: {cascade.model!r} is already the model of a [[backend]]; a "
                                 "cascade needs a name of its own")
            if cascade.model in seen:
                raise ValueError(f"{where}.model: {cascade.model!r} names two cascades")
            seen.add(cascade.model)
            for key in ("small", "large"):
                pool = getattr(cascade, key)
                if pool not in models:
                    raise ValueError(f"{where}.{key}: {pool!r} is not the model of any [[backend]]; expected one of "
                                     f"{', '.join(models)}")
            if cascade.small == cascade.large:
                raise ValueError(f"{where}: small and large are both {cascade.small!r}; expected two pools")
        return self

    def pools(self) -> dict[str, list[BackendConfig]]:
        """Backends by the model name clients ask for."""
        pools: dict[str, list[BackendConfig]] = {}
        for backend in self.backend:
            pools.setdefault(backend.model, []).append(backend)
        return pools


def _describe(error: Any, tree: dict[str, Any]) -> str:
    parts = [str(part) for part in error["loc"]]
    if len(parts) >= 2 and parts[0] in ("backend", "cascade") and parts[1].isdigit():
        table = tree.get(parts[0], [])[int(parts[1])] if isinstance(tree.get(parts[0]), list) else {}
        name = table.get("name" if parts[0] == "backend" else "model") if isinstance(table, dict) else None
        parts[:2] = [f"{parts[0]}[{parts[1]}]" + (f" ({name})" if name else "")]
    message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(parts)}: {message}" if parts else message


def parse_fleet(tree: dict[str, Any], origin: str = "FLEET.toml") -> FleetConfig:
    """Validate a parsed FLEET.toml; the error names the first wrong key."""
    try:
        return FleetConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_describe(error.errors()[0], tree)}") from None


def load_fleet(path: Path) -> FleetConfig:
    """Read and validate FLEET.toml."""
    return parse_fleet(read_toml(path, "fleet file"), str(path))
