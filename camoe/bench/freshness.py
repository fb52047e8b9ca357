"""``camoe bench freshness``: the closed loop on drifting traffic, measured.

* **Freshness** of a click: from its event time (the simulator produces each click at its
  event time) to the ``published_at`` of the first model version that learned it, which
  the trainer stamps once Triton serves that version and it passed its parity check.
  Every model-update lists the click times it is the first to have learned.
* **Online vs frozen, live**: every labelled impression carries the score it was served
  with (by the version live at that moment); a frozen model (version 1's weights, never
  updated) scores the same logged features in process. AUC-PR per format over windows of
  time shows whether learning from the stream pays while the traffic drifts. A window
  holds a few dozen clicks per format, so these curves are noisy.
* **Online vs frozen, at the end**: ``evaluation_requests`` fresh simulated requests in
  the world as it stands when the traffic stops, every candidate's features read from
  the online store (the labeler's counters included) as the scorer reads them, scored by
  the version Triton serves and by the frozen model. AUC-PR is taken against the
  simulator's click probabilities themselves (``expected_auc_pr``), so the comparison
  has no label noise: this is the one a test can hold to. Scoring every candidate, not
  only the winners, also keeps it free of selection: the live impressions are those the
  online model chose, which biases the live comparison towards the frozen model.

The demo prints the same report; this benchmark also writes ``freshness.json``,
``freshness.png`` and ``auc_pr_over_time.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camoe.bench.figures import pyplot, save
from camoe.clients.kafka import Kafka, read_committed
from camoe.features import FORMATS
from camoe.settings import Settings
from camoe.stack.stack import Endpoints
from camoe.streaming.avro import AvroCodec
from trainer.metrics import ece, expected_auc_pr, format_metrics

Report = dict[str, Any]


@dataclass
class LoopRecord:
    """What the loop wrote: each impression's final label (late positives merged into
    their impression) and every model update."""

    impressions: list[dict[str, Any]]  # labelled-event values, one per request id
    updates: list[dict[str, Any]]


def read_record(kafka: Kafka, settings: Settings) -> LoopRecord:
    topics = settings.kafka.topics
    events = read_committed(kafka, topics.labelled_events.name, AvroCodec("labelled_event").decode)
    final: dict[str, dict[str, Any]] = {}
    for event in events:
        request_id = event["impression"]["request_id"]
        if request_id not in final or event["label"] > final[request_id]["label"]:
            final[request_id] = event
    updates = read_committed(kafka, topics.model_updates.name, AvroCodec("model_update").decode)
    unique = {u["version"]: u for u in updates}  # announcements may repeat after a restart
    return LoopRecord(
        sorted(final.values(), key=lambda e: e["impression"]["event_time"]),
        [unique[v] for v in sorted(unique)],
    )


def analyse(record: LoopRecord, frozen: Any, window_s: float, holdout_every: int) -> Report:
    """Freshness percentiles, and AUC-PR per format per time window for the served
    (online) scores and the frozen model's, plus both over the run's second half.
    ``clicks_trainable`` counts the labelled clicks the trainer may learn: all but those
    it holds out for its quality gate (``trainer.holdout_every``)."""
    from trainer.online import Examples, held_out, predict

    freshness = np.asarray(
        [
            (u["published_at"] - t) / 1000
            for u in record.updates
            for t in u.get("learned_click_times", [])
        ]
    )
    report: Report = {
        "versions": len(record.updates),
        "impressions": len(record.impressions),
        "clicks_learned": len(freshness),
        "clicks_trainable": sum(
            e["label"] == 1 and not held_out(e["impression"]["request_id"], holdout_every)
            for e in record.impressions
        ),
    }
    if record.impressions and record.updates:  # when each version was published
        start_ms = min(e["impression"]["event_time"] for e in record.impressions)
        report["published_s"] = [
            round((u["published_at"] - start_ms) / 1000, 2) for u in record.updates
        ]
    if len(record.updates) >= 2:  # the trainer's rate between its first and last version
        first, last = record.updates[0], record.updates[-1]
        seconds = max((last["published_at"] - first["published_at"]) / 1000, 1e-9)
        trained = last["examples_trained"] - first["examples_trained"]
        report["trainer_examples_per_s"] = round(trained / seconds, 1)
    if len(freshness):
        report["freshness_s"] = {
            "p50": round(float(np.percentile(freshness, 50)), 2),
            "p95": round(float(np.percentile(freshness, 95)), 2),
            "max": round(float(freshness.max()), 2),
        }
    if not record.impressions:
        return report
    x = Examples.from_events(record.impressions)
    online = np.asarray([e["impression"]["pctr"] for e in record.impressions])
    frozen_p = predict(frozen, x)
    times = np.asarray([e["impression"]["event_time"] for e in record.impressions]) / 1000
    elapsed = times - times[0]
    windows = []
    for start in np.arange(0, elapsed.max() + 1e-9, window_s):
        rows = (elapsed >= start) & (elapsed < start + window_s)
        windows.append(
            {
                "start_s": float(start),
                **_compare(
                    online[rows], frozen_p[rows], x.label[rows], x.fmt[rows], x.weight[rows]
                ),
            }
        )
    report["windows"] = windows
    late = elapsed >= elapsed.max() / 2
    report["second_half"] = _compare(
        online[late], frozen_p[late], x.label[late], x.fmt[late], x.weight[late]
    )
    report["freshness_samples_s"] = [round(float(f), 3) for f in freshness]
    return report


def _compare(
    online: np.ndarray, frozen: np.ndarray, y: np.ndarray, fmt: np.ndarray, w: np.ndarray
) -> Report:
    """Per format, AUC-PR of the served and the frozen scores of labelled impressions,
    weighted by their importance weights (negatives sampled by the labeler)."""
    out: Report = {}
    for k, name in enumerate(FORMATS):
        rows = fmt == k
        out[name] = {
            "impressions": round(float(w[rows].sum())),
            "clicks": int(y[rows].sum()),
            "online_auc_pr": format_metrics(online[rows], y[rows], w[rows])["auc_pr"],
            "frozen_auc_pr": format_metrics(frozen[rows], y[rows], w[rows])["auc_pr"],
        }
    return out


def evaluate_latest(
    settings: Settings, endpoints: Endpoints, frozen: Any, hours: float, requests: int
) -> Report:
    """AUC-PR per format of the served version and of ``frozen`` on fresh requests drawn
    from the world at ``hours`` (see the module's docstring)."""
    from camoe.clients.feature_store import OnlineFeatures, open_store
    from camoe.clients.triton import TritonClient
    from camoe.features import FeatureLayout
    from camoe.sim.traffic import World
    from trainer.online import Examples, predict

    world = World(settings.simulator)
    rng = np.random.default_rng(settings.simulator.seed + 1)
    batch = [world.request(rng, 0) for _ in range(requests)]
    reader = OnlineFeatures(
        open_store(settings.feast, endpoints.redis, settings.redis), settings.feast.feature_service
    )
    users, ads = reader.read(
        (r["user_id"] for r in batch), (c["ad_id"] for r in batch for c in r["candidates"])
    )
    x = FeatureLayout(settings.features.n_campaigns).encode(batch, users, ads)
    truth = np.asarray(
        [world.true_ctr(r, c["ad_id"], hours) for r in batch for c in r["candidates"]]
    )
    triton = TritonClient(endpoints.triton or "", settings.triton.model_name)
    served, versions = [], set()
    for start in range(0, len(truth), 4096):  # the model's max_batch_size
        rows = slice(start, start + 4096)
        pctr, version = triton.infer(x.categorical[rows], x.numeric[rows], x.fmt[rows])
        served.append(pctr)
        versions.add(version)
    triton.close()
    online = np.concatenate(served)
    frozen_p = predict(frozen, Examples.unweighted(x.categorical, x.numeric, x.fmt, truth))
    out: Report = {"requests": requests, "hours": round(hours, 4), "versions": sorted(versions)}
    for k, name in enumerate(FORMATS):
        rows = x.fmt == k
        out[name] = {
            "candidates": int(rows.sum()),
            "expected_clicks": round(float(truth[rows].sum()), 1),
            **{
                f"{model}_auc_pr": expected_auc_pr(scores[rows], truth[rows])
                for model, scores in (("online", online), ("frozen", frozen_p), ("true", truth))
            },
            # Calibration against the true probabilities: no label noise in it.
            "online_ece": ece(online[rows], truth[rows]),
            "frozen_ece": ece(frozen_p[rows], truth[rows]),
        }
    return out


def summary_lines(report: Report) -> list[str]:
    """The report as a few lines for a terminal."""
    lines = [
        f"model versions served: {report['versions']}, impressions labelled: "
        f"{report['impressions']}, clicks learned: {report['clicks_learned']}"
    ]
    if "freshness_s" in report:
        f = report["freshness_s"]
        lines.append(
            f"freshness (click -> served version that learned it): p50 {f['p50']}s, p95 {f['p95']}s"
        )
    if "windows" in report:
        lines.append("AUC-PR per format over time, online (served) vs frozen (version 1):")
        lines.append("  window  " + "  ".join(f"{f:>17}" for f in FORMATS))
        for w in report["windows"] + [{"start_s": "2nd half", **report["second_half"]}]:
            cells = [
                f"{w[f]['online_auc_pr']:.3f} vs {w[f]['frozen_auc_pr']:.3f}".rjust(17)
                for f in FORMATS
            ]
            start = w["start_s"] if isinstance(w["start_s"], str) else f"{w['start_s']:.0f}s"
            lines.append(f"  {start:>8}" + "  ".join(cells))
    if "latest" in report:
        latest = report["latest"]
        lines.append(
            f"at the end, every candidate of {latest['requests']} fresh requests: AUC-PR of "
            f"served version {'/'.join(latest['versions'])} vs frozen (the simulator's own "
            "probabilities as scores: the best possible)"
        )
        for name in FORMATS:
            f = latest[name]
            lines.append(
                f"  {name:>8}: {f['online_auc_pr']:.3f} vs {f['frozen_auc_pr']:.3f} "
                f"({f['true_auc_pr']:.3f}), ECE {f['online_ece']:.4f} vs {f['frozen_ece']:.4f}, "
                f"{f['expected_clicks']:.0f} clicks expected"
            )
    return lines


def plot(report: Report, out: Path) -> list[Path]:
    plt = pyplot()

    written = []
    samples = np.asarray(report.get("freshness_samples_s", []))
    if len(samples):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(samples, bins=40, color="steelblue")
        for q, style in ((50, "-"), (95, "--")):
            value = float(np.percentile(samples, q))
            ax.axvline(value, color="crimson", linestyle=style, label=f"p{q} {value:.1f} s")
        ax.set_xlabel("click event time to a served version that learned it (s)")
        ax.set_ylabel("clicks")
        ax.set_title("Freshness")
        ax.legend()
        fig.tight_layout()
        written.append(save(fig, out / "freshness.png"))
    if report.get("windows"):
        fig, axes = plt.subplots(1, len(FORMATS), figsize=(13, 4), sharey=True)
        starts = [w["start_s"] for w in report["windows"]]
        for ax, name in zip(axes, FORMATS, strict=True):
            for kind, color in (("online", "seagreen"), ("frozen", "grey")):
                ax.plot(
                    starts,
                    [w[name][f"{kind}_auc_pr"] for w in report["windows"]],
                    marker="o",
                    color=color,
                    label=f"{kind} model",
                )
            ax.set_title(name)
            ax.set_xlabel("seconds into the run")
        axes[0].set_ylabel("AUC-PR of served impressions")
        axes[0].legend()
        fig.suptitle("Online learning vs a frozen model while the traffic drifts")
        fig.tight_layout()
        written.append(save(fig, out / "auc_pr_over_time.png"))
    return written


def demo_plot(report: Report, latency: list[dict[str, float]], path: Path) -> Path:
    """One picture of a demo run: served AUC-PR per format over time against the frozen
    model (each version's publish marked), freshness, latency over time, and online vs
    frozen at the end against the simulator's own probabilities."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    windows = report.get("windows", [])
    for ax, name in zip(axes[0], FORMATS, strict=True):
        for when in report.get("published_s", []):
            ax.axvline(when, color="lightgrey", linewidth=0.6, zorder=0)
        for kind, color in (("online", "seagreen"), ("frozen", "grey")):
            ax.plot(
                [w["start_s"] for w in windows],
                [w[name][f"{kind}_auc_pr"] for w in windows],
                marker="o",
                color=color,
                label=f"{kind} model",
            )
        ax.set_title(f"{name}: AUC-PR of served impressions")
        ax.set_xlabel("seconds into the run (grey: a version published)")
    axes[0][0].legend()
    samples = np.asarray(report.get("freshness_samples_s", []))
    ax = axes[1][0]
    if len(samples):
        ax.hist(samples, bins=40, color="steelblue")
        for q, style in ((50, "-"), (95, "--")):
            value = float(np.percentile(samples, q))
            ax.axvline(value, color="crimson", linestyle=style, label=f"p{q} {value:.1f} s")
        ax.legend()
    ax.set_title("Freshness: click to a served version that learned it")
    ax.set_xlabel("seconds")
    ax = axes[1][1]
    for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
        ax.plot(
            [w["start_s"] for w in latency],
            [w[key] for w in latency],
            linestyle=style,
            color="darkorange",
            label=key.split("_")[0],
        )
    ax.set_title("Scoring latency, request produced to scores read")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("ms")
    ax.legend()
    ax = axes[1][2]
    latest = report.get("latest")
    if latest:
        x = np.arange(len(FORMATS))
        for offset, (kind, color) in enumerate(
            (("online", "seagreen"), ("frozen", "grey"), ("true", "black"))
        ):
            ax.bar(
                x + (offset - 1) * 0.27,
                [latest[name][f"{kind}_auc_pr"] for name in FORMATS],
                width=0.27,
                color=color,
                label="the true probabilities" if kind == "true" else f"{kind} model",
            )
        ax.set_xticks(x, FORMATS)
        top = max(latest[name]["true_auc_pr"] for name in FORMATS)
        ax.set_ylim(0, 1.35 * top)  # room for the legend above the bars
        ax.legend(loc="upper left", fontsize="small", ncols=3)
    ax.set_title("At the end: AUC-PR vs the true click probabilities")
    fig.tight_layout()
    return save(fig, path)


def reporter(
    window_s: float, evaluation_requests: int = 20_000
) -> Callable[[Settings, Endpoints], Report]:
    """What ``run_loop`` calls after the traffic, while the services still run."""

    def report(settings: Settings, endpoints: Endpoints) -> Report:
        from trainer.train import load_model

        frozen = load_model(settings, settings.trainer.checkpoint_dir / "model.pt")
        record = read_record(endpoints.kafka_at(settings.kafka.security), settings)
        result = analyse(record, frozen, window_s, settings.trainer.holdout_every)
        if record.impressions:
            times = [e["impression"]["event_time"] for e in record.impressions]
            hours = (max(times) - min(times)) / 3_600_000  # the drift's clock at the end
            result["latest"] = evaluate_latest(
                settings, endpoints, frozen, hours, evaluation_requests
            )
        return result

    return report


def run(
    settings: Settings,
    out: Path,
    duration_s: float,
    window_s: float = 30.0,
    progress: Callable[[str], None] = print,
) -> Report:
    """Runs the loop (the demo's traffic, the default publishing cadence) and writes the
    report and plots under ``out``."""
    from camoe.sim.loop import demo_settings, run_loop

    out.mkdir(parents=True, exist_ok=True)
    summary = run_loop(demo_settings(settings), duration_s, progress, report=reporter(window_s))
    report = summary.pop("loop")
    report["traffic"] = summary
    report["cadence"] = {
        "publish_every_examples": settings.trainer.publish_every_examples,
        "publish_every_s": settings.trainer.publish_every_s,
    }
    (out / "freshness.json").write_text(json.dumps(report, indent=2))
    for line in summary_lines(report):
        progress(line)
    for path in plot(report, out):
        progress(f"wrote {path}")
    progress(f"wrote {out / 'freshness.json'}")
    return report
