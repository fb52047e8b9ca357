"""Builds each long-running component from the settings: the scoring consumer, the
labeler and the incremental trainer (the CLI runs one per process), and brings the
local stack up with the model served."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from threading import Event

from camoe.clients.feature_store import (
    OnlineFeatures,
    counter_pusher,
    open_store,
    profile_restorer,
)
from camoe.clients.kafka import cluster_id
from camoe.clients.triton import TritonClient
from camoe.settings import Settings, StreamSettings
from camoe.stack.stack import SERVICES, Endpoints, Stack
from camoe.streaming.app import StreamApp
from camoe.streaming.avro import codec_for
from camoe.streaming.metrics import serve
from consumers.labeler import Labeler
from consumers.metrics import LabelerCollector
from consumers.scoring import Scorer
from trainer.versions import broken_dir, keep_served

log = logging.getLogger(__name__)

CODECS = {  # topic field in settings -> schema name
    "ad_requests": "ad_request",
    "ad_scores": "ad_scores",
    "feature_log": "feature_log",
    "ad_clicks": "ad_click",
    "labelled_events": "labelled_event",
    "model_updates": "model_update",
    "dead_letters": "dead_letter",
    "labeler_state": "labeler_state",
    "counter_updates": "counter_update",
}


class NotRunningError(RuntimeError):
    """A service the component needs has no address."""


def stack_up(settings: Settings, services: tuple[str, ...] = SERVICES) -> Endpoints:
    """The stack's services started where none is configured; a Triton that starts and
    finds the newest version unable to load gets the newest that loads served
    (``keep_served``), so the model is not left without a version."""
    endpoints = Stack(settings).up(services)
    if "triton" in endpoints.pids and endpoints.triton:
        repo, name = Path(settings.triton.model_repo), settings.triton.model_name
        client = TritonClient(endpoints.triton, name)
        try:
            keep_served(client, repo / name, broken_dir(repo, name, settings.triton.staging_dir))
        finally:
            client.close()
    return endpoints


def endpoints_for(settings: Settings, *needed: str) -> Endpoints:
    endpoints = Stack(settings).endpoints()
    variables = {"kafka": "KAFKA_BOOTSTRAP_SERVERS", "triton": "TRITON_URL", "redis": "REDIS_URL"}
    for name in needed:
        if getattr(endpoints, name) is None:
            raise NotRunningError(
                f"{name} is not running: start the stack (`camoe stack up`) "
                f"or set {variables[name]}"
            )
    return endpoints


def _codecs(settings: Settings, *fields: str) -> dict[str, object]:
    topics = settings.kafka.topics
    return {
        getattr(topics, f).name: codec_for(
            CODECS[f], settings.kafka.schema_registry_url, getattr(topics, f).name
        )
        for f in fields
    }


def _app(
    settings: Settings,
    name: str,
    options: StreamSettings,
    sources: tuple[str, ...],
    sinks: tuple[str, ...],
) -> StreamApp:
    """The stream app of component ``name``, built from its settings section."""
    endpoints = endpoints_for(settings, "kafka")
    return StreamApp(
        name=name,
        kafka=endpoints.kafka_at(settings.kafka.security),
        sources=_codecs(settings, *sources),
        sinks=_codecs(settings, *sinks),
        dead_letter_topic=settings.kafka.topics.dead_letters.name,
        options=options,
        instance_id=f"{name}-{settings.worker_id}",
    )


def _serve_metrics(app: StreamApp, options: StreamSettings) -> None:
    if options.metrics_port is not None:
        serve(app.registry, options.metrics_port, options.metrics_address)


def run_scoring(settings: Settings, stop: Event) -> None:
    needed = ("kafka", "triton") + (("redis",) if settings.feast.online_store == "redis" else ())
    endpoints = endpoints_for(settings, *needed)
    features = OnlineFeatures(
        open_store(settings.feast, endpoints.redis, settings.redis),
        settings.feast.feature_service,
        cache_s=settings.scoring.feature_cache_s,
    )
    s = settings.scoring
    triton = TritonClient(
        endpoints.triton,
        settings.triton.model_name,
        settings.triton.timeout_s,
        max_in_flight=2,  # the wave being scored and the next (consumers/scoring.py)
    )
    app = _app(settings, "scoring", s, ("ad_requests",), ("ad_scores", "feature_log"))
    scorer = Scorer(
        settings,
        features,
        triton,
        app.partitions(settings.kafka.topics.ad_scores.name),
        registry=app.registry,
    )
    _serve_metrics(app, s)
    # Feast, protobuf and gRPC leave about a million long-lived objects: a full garbage
    # collection walking them stalled scoring for 300 ms. Frozen, they are never walked.
    gc.collect()
    gc.freeze()
    log.info("scoring consumer running (%s, Triton policy %s)", s.guarantee, s.triton_policy)
    app.run(scorer, stop)


def run_labeler(settings: Settings, stop: Event) -> None:
    from camoe.streaming.changelog import read_changelog

    endpoints = endpoints_for(settings, "kafka")
    topics = settings.kafka.topics
    spec = (topics.feature_log, topics.ad_clicks, topics.labeler_state, topics.counter_updates)
    if len({t.partitions for t in spec}) != 1:
        raise ValueError(
            "feature_log, ad_clicks, labeler_state and counter_updates need one partition "
            "count: the labeler's state is kept per input partition"
        )
    store = open_store(settings.feast, endpoints.redis, settings.redis)
    app = _app(
        settings,
        "labeler",
        settings.labeler,
        ("feature_log", "ad_clicks", "counter_updates"),
        ("labelled_events", "labeler_state", "counter_updates"),
    )
    state, kafka = topics.labeler_state.name, endpoints.kafka_at(settings.kafka.security)
    labeler = Labeler(
        topics.feature_log.name,
        topics.labelled_events.name,
        state,
        topics.counter_updates.name,
        settings.labeler.attribution_window_s,
        read_state=lambda partitions: read_changelog(kafka, state, app.sinks[state], partitions),
        push_counters=counter_pusher(store),
        restore_store=profile_restorer(store),
        negative_sampling_rate=settings.labeler.negative_sampling_rate,
        fake_negative=settings.labeler.feedback == "fake-negative",
        max_clock_skew_s=settings.labeler.max_clock_skew_s,
    )
    app.registry.register(LabelerCollector(labeler))
    _serve_metrics(app, settings.labeler)
    log.info(
        "labeler running (%s mode, window %.1fs, negatives sampled at %g, exactly-once)",
        settings.labeler.feedback,
        settings.labeler.attribution_window_s,
        settings.labeler.negative_sampling_rate,
    )
    app.run(labeler, stop, hooks=labeler)


def run_trainer(settings: Settings, stop: Event) -> None:
    # torch only here: the scorer and the labeler start faster without it.
    import torch

    from trainer.export import Publisher
    from trainer.online import Checkpoint, IncrementalTrainer
    from trainer.train import load_model

    endpoints = endpoints_for(settings, "kafka", "triton")
    t = settings.trainer
    torch.set_num_threads(t.torch_threads)
    resume = Checkpoint.load(t.checkpoint_dir / "trainer.pt")
    model = load_model(settings, t.checkpoint_dir / "model.pt")
    if model is None:
        raise NotRunningError(
            f"no usable model at {t.checkpoint_dir / 'model.pt'}: run `camoe prepare` first"
        )
    client = TritonClient(endpoints.triton, settings.triton.model_name, settings.triton.timeout_s)
    app = _app(settings, "trainer", t, ("labelled_events",), ("model_updates",))
    trainer = IncrementalTrainer(
        settings,
        model,
        Publisher(
            settings.triton.model_repo,
            settings.triton.model_name,
            client,
            keep=t.keep_versions,
            staging=settings.triton.staging_dir,
        ),
        t.checkpoint_dir / "trainer.pt",
        cluster_id(endpoints.kafka_at(settings.kafka.security)),
        resume,
        registry=app.registry,
    )
    _serve_metrics(app, t)
    log.info(
        "incremental trainer running (publish every %d examples or %.0fs)",
        t.publish_every_examples,
        t.publish_every_s,
    )
    app.run(trainer, stop, commit_policy=trainer.committable, hooks=trainer)
