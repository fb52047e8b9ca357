"""One typed settings object for every process of the system.

Values come from, highest priority first: keyword arguments, ``CAMOE_*`` environment
variables (nested with ``__``, e.g. ``CAMOE_SCORING__BATCH_SIZE=256``), the three
service variables users already know (``KAFKA_BOOTSTRAP_SERVERS``, ``TRITON_URL``,
``REDIS_URL``), the YAML file named by ``CAMOE_CONFIG`` (default ``camoe.yaml`` in the
working directory, if present), and the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ROOT = Path(__file__).resolve().parent.parent

DeliveryGuarantee = Literal["at-least-once", "exactly-once"]


class Section(BaseModel):
    """A settings section: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSpec(Section):
    name: str
    partitions: int = 1
    compacted: bool = Field(default=False, description="cleanup.policy=compact (changelogs)")


class TopicsSettings(Section):
    """Topic names and partition counts; the record schemas are in ``camoe/streaming/schemas/``."""

    ad_requests: TopicSpec = TopicSpec(name="ad-requests", partitions=4)
    ad_scores: TopicSpec = TopicSpec(name="ad-scores", partitions=4)
    feature_log: TopicSpec = TopicSpec(name="feature-log", partitions=4)
    ad_clicks: TopicSpec = TopicSpec(name="ad-clicks", partitions=4)
    labelled_events: TopicSpec = TopicSpec(name="labelled-events", partitions=1)
    model_updates: TopicSpec = TopicSpec(name="model-updates", partitions=1)
    dead_letters: TopicSpec = TopicSpec(name="dead-letters", partitions=1)
    # The labeler's state changelog: partition n holds the state of its inputs' partition n.
    labeler_state: TopicSpec = TopicSpec(name="labeler-state", partitions=4, compacted=True)
    # The labeler's counter increments, keyed by user or ad: the repartition that makes
    # each entity's counter one worker's, exact however many labelers run.
    counter_updates: TopicSpec = TopicSpec(name="counter-updates", partitions=4)

    def all(self) -> list[TopicSpec]:
        return [getattr(self, name) for name in type(self).model_fields]


class Credentials(Section):
    """A user and its password, given inline (an environment variable, say) or as a file;
    ``section`` names the settings section in messages."""

    section: ClassVar[str]
    username: str | None = None
    password: SecretStr | None = Field(default=None, description="never logged")
    password_file: Path | None = Field(
        default=None, description="a file holding the password, instead of ``password``."
    )

    @model_validator(mode="after")
    def _one_password(self) -> Credentials:
        if self.password is not None and self.password_file is not None:
            raise ValueError(f"{self.section}: set password or password_file, not both")
        if self.username is not None and self.password is None and self.password_file is None:
            raise ValueError(f"{self.section}.username is {self.username!r} but no password is set")
        return self

    def secret(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as error:
                raise ValueError(
                    f"{self.section}.password_file: cannot read {self.password_file}: "
                    f"{error.strerror}"
                ) from None
        return None if self.password is None else self.password.get_secret_value()


class KafkaSecurity(Credentials):
    """How every Kafka client reaches the cluster: librdkafka's ``security.protocol``,
    SASL user and CA, set here once for the components, the simulator, the admin client
    and the benchmarks. The password comes from ``CAMOE_KAFKA__SECURITY__PASSWORD`` or
    ``password_file``, never from the settings file."""

    section: ClassVar[str] = "kafka.security"
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    username: str | None = Field(default=None, description="SASL user (SASL_* protocols).")
    ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA that signed the brokers' certificates (SSL and "
        "SASL_SSL); unset: the system's CA store",
    )
    check_hostname: bool = Field(
        default=True,
        description="the broker's certificate must name the host (or IP) it is reached at",
    )

    @model_validator(mode="after")
    def _sasl_user(self) -> KafkaSecurity:
        sasl = self.protocol.startswith("SASL_")
        if sasl and self.username is None:
            raise ValueError(
                f"kafka.security.protocol is {self.protocol}: set kafka.security.username"
            )
        if not sasl and self.username is not None:
            raise ValueError(
                f"kafka.security.username is set but protocol {self.protocol} has no SASL: "
                "set kafka.security.protocol to SASL_SSL"
            )
        return self


class KafkaSettings(Section):
    bootstrap_servers: str | None = Field(
        default=None, description="Existing cluster; when unset the local stack starts a broker."
    )
    version: str = "4.1.1"
    heap_mb: int = 512
    schema_registry_url: str | None = None
    security: KafkaSecurity = KafkaSecurity()
    topics: TopicsSettings = TopicsSettings()


class TritonSettings(Section):
    url: str | None = Field(
        default=None, description="Existing server's gRPC host:port; unset starts a local one."
    )
    http_url: str | None = None
    model_name: str = "camoe"
    model_repo: Path = ROOT / "model_repo"
    staging_dir: Path | None = Field(
        default=None,
        description="where the trainer writes and checks a version before renaming it into "
        "model_repo: outside the repository Triton serves, on its filesystem (the rename "
        "must be atomic); unset: .<model_repo>-staging beside it",
    )
    timeout_s: float = 5.0
    max_batch_size: int = Field(
        default=4096,
        gt=0,
        description="most rows per inference: max_batch_size of the model's config.pbtxt",
    )


class RedisSettings(Credentials):
    """Where Feast's Redis online store is, and the ACL user it is reached as."""

    section: ClassVar[str] = "redis"
    url: str | None = Field(default=None, description="redis://host:port; unset starts one.")
    username: str | None = Field(
        default=None,
        description="ACL user of the online store and the fast reader; the stack's Redis "
        "then starts with only this user enabled.",
    )
    password: SecretStr | None = Field(
        default=None, description="the user's password (CAMOE_REDIS__PASSWORD); never logged."
    )


class FeastSettings(Section):
    repo_path: Path = ROOT / "feature_repo"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    feature_service: str = "camoe_v1"


class FeaturesSettings(Section):
    """Sizes of the model's inputs that are not fixed by the schema (camoe/features.py)."""

    n_campaigns: int = Field(
        default=40,
        gt=0,
        description="campaign vocabulary: campaign_index runs 1..n_campaigns, any other "
        "index is unknown (0); it sizes the model's campaign embedding",
    )


class SimulatorSettings(Section):
    """Parameters of the traffic simulator's generative model (see camoe/sim/traffic.py)."""

    seed: int = 7
    n_users: int = 2_000
    n_ads: int = 200
    n_campaigns: int = Field(
        default=40, description="campaigns of the simulated world, at most features.n_campaigns"
    )
    candidates_per_request: int = 4
    format_shares: dict[str, float] = {"audio": 0.70, "video": 0.10, "display": 0.20}
    base_ctr: dict[str, float] = {"audio": 0.002, "video": 0.006, "display": 0.004}
    foreground_share: float = 0.3
    foreground_lift: float = 10.0
    affinity_dim: int = 4
    affinity_strength: float = 1.2
    cross_strength: float = 0.8
    click_delay_median_s: float = 2.0
    click_delay_sigma: float = 1.0
    drift_per_hour: float = Field(default=0.02, description="radians per hour the taste turns")
    effect_drift_per_hour: float = Field(
        default=0.0,
        description="radians per hour of the format-specific effects' cycle: they are scaled "
        "by cos(rate x hours), so they fade and turn around (0: they stay)",
    )
    format_taste_turn: float = Field(
        default=0.0, description="radians between audio's and video's taste (0: one taste)"
    )
    requests_per_second: float = 50.0
    click_boost: float = Field(
        default=1.0,
        description="Multiplies every CTR; raise it in short demos so a minute yields labels.",
    )


class StreamSettings(Section):
    """A stream app's options (camoe/streaming/app.py builds the app from them); each
    component's section holds them, with defaults of its own."""

    group_id: str
    guarantee: DeliveryGuarantee = "at-least-once"
    max_clock_skew_s: float = Field(
        default=300.0,
        gt=0,
        description="an input whose event time is further ahead of this process's clock is "
        "dead-lettered: a time far in the future would make the labeler close every open "
        "window at once. Times in the past are a backlog and are processed",
    )
    batch_size: int = Field(
        default=500,
        gt=0,
        description="most records per batch; a batch is what has arrived (within "
        "batch_interval_ms), so at low rates batches stay small and only a backlog fills them",
    )
    poll_timeout_s: float = Field(
        default=0.1, gt=0, description="longest wait for a first record of a batch"
    )
    batch_interval_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long the broker may hold a fetch while records arrive (0: it "
        "answers at once): records come in batches about this far apart, a backlog at once "
        "but for its last MiB. Each batch has a cost of its own in this process and in the "
        "broker, whatever its size: larger batches take less CPU for up to this much more "
        "latency",
    )
    in_flight_batches: int = Field(
        default=4,
        ge=0,
        description="at-least-once: how many full batches of records (in_flight_batches x "
        "batch_size) may await the broker's acknowledgement of their outputs, offsets not "
        "yet committed, while the next is processed; a crash re-processes at most these and "
        "the batch in hand",
    )
    commit_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="at-least-once: least seconds between two offset commits (sooner when "
        "the uncommitted records exceed in_flight_batches full batches); each commit is a "
        "write to the broker's offsets log",
    )
    linger_ms: float = Field(
        default=2.0,
        ge=0,
        description="the producer's wait for more records per request; a batch's outputs "
        "are produced in one burst, so it need only cover that",
    )
    metrics_port: int | None = Field(
        default=None,
        description="Prometheus /metrics at this port of metrics_address (0: any free port; "
        "unset: none)",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="the address /metrics binds: loopback, unless Prometheus scrapes from "
        "another host or container (0.0.0.0 in docker-compose.yml, on its own network)",
    )


def stream_default(name: str, default: Any) -> Any:
    """A component's own default for StreamSettings field ``name``, keeping its rules and
    description."""
    return FieldInfo.merge_field_infos(StreamSettings.model_fields[name], default=default)


class ScoringSettings(StreamSettings):
    group_id: str = "camoe-scoring"
    batch_size: int = stream_default("batch_size", 512)
    poll_timeout_s: float = stream_default("poll_timeout_s", 0.05)
    batch_interval_ms: float = stream_default("batch_interval_ms", 10.0)
    scores_partitioning: Literal["batch", "key"] = Field(
        default="batch",
        description="where ad-scores records go: 'batch', each batch's to one partition, in "
        "turn (the broker appends, and a reader fetches, one partition per batch instead of "
        "every partition); 'key', by request id, so that a request's duplicates share a "
        "partition. The key is the request id either way",
    )
    linger_ms: float = stream_default("linger_ms", 0.5)
    commit_interval_s: float = stream_default("commit_interval_s", 0.1)
    max_candidates: int = Field(
        default=32,
        gt=0,
        description="most candidates of one request; a request with more is dead-lettered",
    )
    triton_chunk_requests: int = Field(
        default=128,
        gt=0,
        description="requests per Triton call (a wave): while Triton scores one wave of a "
        "batch, the scorer prepares the next and builds the previous one's outputs. A wave "
        "of requests with max_candidates each must fit triton.max_batch_size",
    )
    triton_retries: int = 3
    triton_backoff_s: float = Field(default=0.05, description="doubles after each retry")
    triton_policy: Literal["hold", "fallback"] = Field(
        default="hold",
        description="when Triton stays down: hold (pause, re-read the batch later) or answer "
        "with per-format prior CTRs flagged 'fallback'",
    )
    hold_retry_s: float = 1.0
    feature_cache_s: dict[str, float] = Field(
        default={
            "user_profile": 30.0,
            "ad_profile": 30.0,
            "user_counters": 1.0,
            "ad_counters": 1.0,
        },
        description="seconds the scorer keeps a feature view's rows (see OnlineFeatures)",
    )
    prior_ctr: dict[str, float] = Field(
        default={"audio": 0.0085, "video": 0.024, "display": 0.016},
        description="fallback scores: each format's mean CTR",
    )


class LabelerSettings(StreamSettings):
    group_id: str = "camoe-labeler"
    # Its state changelog must commit with the labels it goes with.
    guarantee: Literal["exactly-once"] = "exactly-once"
    attribution_window_s: float = 10.0
    feedback: Literal["window", "fake-negative"] = Field(
        default="fake-negative",
        description="window: an impression is labelled once, 1 on a click inside the "
        "attribution window, else 0 when it closes (a later click is a late positive); "
        "fake-negative: every impression is emitted as a 0 at once and every click once more "
        "as a 1, and the trainer corrects the bias by fake-negative weighting (Ktena et al. "
        "2019), so nothing waits for the window",
    )
    negative_sampling_rate: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="share of negatives emitted to labelled-events, chosen by a hash of the "
        "request id (a replay decides the same); each carries weight 1 / this share, which "
        "the trainer's loss and metrics apply, so pCTR stays calibrated. Positives and late "
        "positives are all emitted",
    )


class TrainerSettings(StreamSettings):
    group_id: str = "camoe-trainer"
    # Offsets are committed with the trainer's checkpoint (trainer/online.py).
    guarantee: Literal["at-least-once"] = "at-least-once"
    batch_size: int = stream_default("batch_size", 1024)
    pretrain_batch_size: int = Field(default=256, gt=0, description="the offline fit of version 1")
    pretrain_learning_rate: float = Field(
        default=3e-3, gt=0, description="the offline fit of version 1"
    )
    online_batch_size: int = Field(
        default=64,
        gt=0,
        description="the incremental trainer's mini-batch: small, so that a few thousand "
        "events are enough steps to follow drifting traffic",
    )
    online_learning_rate: float = Field(
        default=2e-3,
        gt=0,
        description="the incremental trainer's step size (Adam): large enough that a few "
        "thousand events move the model, small enough that the quality gate passes it",
    )
    publish_every_examples: int = 2_000
    publish_every_s: float = Field(
        default=5.0, description="publish when this long has passed and anything was learned"
    )
    torch_threads: int = Field(
        default=1,
        gt=0,
        description="torch's intra-op threads in the incremental trainer: its mini-batches "
        "are small, and a second thread buys no speed for about 1.7 times the CPU, CPU the "
        "scorer and labeler need when they share the machine",
    )
    publish_time_share: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="the most of the trainer's time its cadence turns (gate, publish, "
        "checkpoint) may take: after a turn of d seconds, training goes on for at least "
        "d x (1 - share) / share before the next, whatever publish_every_examples says",
    )
    pretrain_requests: int = 20_000
    pretrain_hours: float = Field(
        default=24.0, description="simulated hours of history before live traffic starts"
    )
    checkpoint_dir: Path = ROOT / ".cache" / "trainer"
    holdout_every: int = Field(
        default=10, description="one labelled event in this many is held out for the gate"
    )
    holdout_size: int = Field(
        default=500,
        description="recent held-out events kept: recent, so the gate judges on today's traffic",
    )
    gate_tolerance: float = Field(
        default=0.05,
        description="a candidate may be this much (relative) worse in held-out logloss",
    )
    prequential_window: int = Field(
        default=5_000, description="recent events the live AUC-PR, logloss and ECE cover"
    )
    keep_versions: int = Field(
        default=5,
        ge=2,
        description="versions kept on disk, for `camoe models rollback` and `pin` (Triton "
        "loads the newest two)",
    )


class ModelSettings(Section):
    """CAMoE hyper-parameters; constructor keywords equal these keys."""

    embedding_dim: int = 8
    cross_layers: int = 2
    expert_hidden: list[int] = [64, 32]
    shared_experts: int = 2
    experts_per_group: int = 2
    tower_hidden: list[int] = [16]
    groups: list[list[str]] = [["audio", "display"], ["video"]]


class BenchSettings(Section):
    """``camoe bench quality``: every model on the same simulated, time-ordered history."""

    requests: int = Field(
        default=500_000,
        gt=0,
        description="simulated impressions per seed; on MovieLens-100k, the most ratings "
        "read, the first in time (all of them by default)",
    )
    hours: float = 24.0
    calibration_fraction: float = 0.1
    test_fraction: float = 0.2
    epochs: int = 2
    batch_size: int = 512
    learning_rate: float = 3e-3
    seeds: int = 3
    models: list[str] = [
        "camoe",
        "dcn_global",
        "dcn_single_task",
        "shared_bottom",
        "mmoe",
        "content_mmoe",
        "camoe_no_grouping",
        "camoe_no_masking",
        "camoe_soft_masking",
        "camoe_no_dcn",
    ]


class DemoSettings(Section):
    """``make demo`` and ``camoe bench freshness``: a bounded run of the whole loop on
    drifting traffic."""

    duration_s: float = 150.0
    requests_per_second: float = 50.0
    click_boost: float = Field(default=10.0, description="enough clicks in minutes to measure")
    drift_per_hour: float = Field(
        default=60.0, description="radians per hour the taste turns (60: one a minute)"
    )
    effect_drift_per_hour: float = Field(
        default=75.0,
        description="the format-specific effects turn around within two minutes, so the "
        "frozen version 1 falls behind within the run",
    )
    cross_strength: float = Field(
        default=2.0, description="stronger format-specific effects, so their drift matters"
    )
    format_shares: dict[str, float] = Field(
        default={"audio": 0.5, "video": 0.25, "display": 0.25},
        description="more video and display than the default world, so each format gets "
        "enough labels in minutes",
    )


class StackSettings(Section):
    state_dir: Path = ROOT / ".cache" / "stack"
    startup_timeout_s: float = 90.0
    ports: dict[Literal["kafka", "triton", "redis"], int] = Field(
        default={}, description="Fixed ports for the local services (Triton: gRPC); else free ones."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CAMOE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    worker_id: int = Field(
        default=0, description="this process's index among the workers of one component"
    )
    kafka: KafkaSettings = KafkaSettings()
    triton: TritonSettings = TritonSettings()
    redis: RedisSettings = RedisSettings()
    feast: FeastSettings = FeastSettings()
    features: FeaturesSettings = FeaturesSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    scoring: ScoringSettings = ScoringSettings()
    labeler: LabelerSettings = LabelerSettings()
    trainer: TrainerSettings = TrainerSettings()
    model: ModelSettings = ModelSettings()
    stack: StackSettings = StackSettings()
    demo: DemoSettings = DemoSettings()
    bench: BenchSettings = BenchSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Constraints across sections, checked when the settings load."""
        s = self.scoring
        wave = s.triton_chunk_requests * s.max_candidates
        if wave > self.triton.max_batch_size:
            raise ValueError(
                f"a wave of scoring.triton_chunk_requests x scoring.max_candidates = {wave} "
                f"rows exceeds triton.max_batch_size {self.triton.max_batch_size}: lower one "
                "of the two, or raise max_batch_size in config.pbtxt and triton.max_batch_size"
            )
        if self.simulator.n_campaigns > self.features.n_campaigns:
            raise ValueError(
                f"simulator.n_campaigns {self.simulator.n_campaigns} exceeds the model's "
                f"campaign vocabulary features.n_campaigns {self.features.n_campaigns}"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            ServiceUrlSource(settings_cls),
            YamlFileSource(settings_cls),
        )


class ServiceUrlSource(PydanticBaseSettingsSource):
    """Reads the conventional service variables: set one and that service is not started."""

    VARIABLES: ClassVar[dict[str, tuple[str, str]]] = {
        "KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
        "TRITON_URL": ("triton", "url"),
        "REDIS_URL": ("redis", "url"),
    }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for variable, (section, key) in self.VARIABLES.items():
            if os.environ.get(variable):
                values.setdefault(section, {})[key] = os.environ[variable]
        return values


class YamlFileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = Path(os.environ.get("CAMOE_CONFIG", "camoe.yaml"))
        if not path.exists():
            if "CAMOE_CONFIG" in os.environ:
                raise FileNotFoundError(f"CAMOE_CONFIG names {path}, which does not exist")
            return {}
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config file must be a mapping of sections")
        return data


def describe(error: ValidationError) -> str:
    """A settings error as one line: each wrong key and what is wrong with it."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "invalid settings: " + "; ".join(problems)
