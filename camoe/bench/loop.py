"""``camoe bench loop``: the whole loop at several request rates, measured.

For each rate, ``duration_s`` of the demo's drifting traffic runs through the whole loop
(topics of its own, a fresh version 1), sampled every ``SAMPLE_S`` while it runs:

* per component (scoring consumer, labeler, trainer): the input rate (records appended
  to its input topics per second), the processed rate (its group's committed offsets per
  second), its consumer-group lag over time (end offsets minus committed offsets; the
  trainer commits at its checkpoints, so its lag saw-tooths up to one publishing
  cadence of input) and its CPU, in cores, from ``/proc`` (a process and its children);
  the broker's, Triton's and Redis's CPU too, when the stack started them;
* for the loop, the freshness bench's report: freshness p50 and p95, clicks learned,
  online against frozen AUC-PR and ECE at the end.

A component **keeps up** when its lag at the end of the traffic is at most
``KEPT_UP_S`` seconds of its input. The loop **sustains** a rate when every component
keeps up and at least ``LEARNED_SHARE`` of the clicks it could learn (all but those held
out for the quality gate) were learned by the end.
``loop.json`` names the highest rate sustained.

The trainer's floor is the same model trained in this process on the same kind of
events, in mini-batches of ``trainer.online_batch_size``: examples per second. The
trainer's ratio is the examples it trained per second of traffic over that floor (at a
rate it keeps up with, the ratio says how much of the floor the input needed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from camoe.bench.figures import pyplot, save
from camoe.bench.freshness import reporter
from camoe.clients.kafka import committed_offsets, consumer_config
from camoe.settings import Settings
from camoe.stack.stack import Endpoints, Stack

Report = dict[str, Any]
SAMPLE_S = 2.0
KEPT_UP_S = 20.0
LEARNED_SHARE = 0.9
# component -> (its settings section, the topic fields it consumes)
INPUTS = {
    "score": ("scoring", ("ad_requests",)),
    "label": ("labeler", ("feature_log", "ad_clicks", "counter_updates")),
    "train": ("trainer", ("labelled_events",)),
}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) of each process and all its descendants so far, those
    that have ended included (Triton's stub of an unloaded version, say)."""
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command may hold spaces and parentheses: fields count from its end.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        parent[int(entry.name)] = int(fields[1])
        # utime, stime, and the cutime and cstime of its children that have ended.
        used[int(entry.name)] = sum(int(f) for f in fields[11:15]) / TICKS
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)

    def tree(pid: int) -> float:
        return used.get(pid, 0.0) + sum(tree(c) for c in children.get(pid, []))

    return {name: tree(pid) for name, pid in pids.items()}


class Sampler:
    """Every ``SAMPLE_S``: each component's end and committed offsets, and CPU seconds."""

    def __init__(
        self, settings: Settings, endpoints: Endpoints, processes: dict[str, Popen[bytes]]
    ) -> None:
        kafka = endpoints.kafka_at(settings.kafka.security)
        topics = settings.kafka.topics
        self.inputs = {
            name: (
                Consumer(consumer_config(kafka, getattr(settings, section).group_id)),
                [getattr(topics, field).name for field in fields],
            )
            for name, (section, fields) in INPUTS.items()
        }
        self.pids = {name: p.pid for name, p in processes.items()}
        self.pids.update({f"{name} (service)": pid for name, pid in endpoints.pids.items()})
        self.samples: list[Report] = []
        self.started = time.monotonic()

    def sample(self) -> None:
        offsets = {}
        for name, (consumer, topics) in self.inputs.items():
            end = committed = 0
            for topic in topics:
                done = committed_offsets(consumer, topic)
                for partition, offset in done.items():
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition))
                    end += high
                    committed += offset if offset >= 0 else low
            offsets[name] = {"end": end, "committed": committed}
        self.samples.append(
            {
                "t": time.monotonic() - self.started,
                "offsets": offsets,
                "cpu_s": cpu_seconds(self.pids),
            }
        )

    def close(self) -> None:
        for consumer, _ in self.inputs.values():
            consumer.close()


def watcher(result: Report) -> Callable[..., Any]:
    """The ``watch`` of ``run_loop``: samples in a thread while the traffic runs."""

    @contextmanager
    def watch(
        settings: Settings, endpoints: Endpoints, processes: dict[str, Popen[bytes]]
    ) -> Iterator[Report]:
        sampler = Sampler(settings, endpoints, processes)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    sampler.sample()
                except Exception as error:  # a busy coordinator: the next sample will do
                    result.setdefault("sample_errors", []).append(str(error))
                stop.wait(SAMPLE_S)

        thread = threading.Thread(target=loop, name="loop-sampler", daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join(30)
            sampler.close()
            result["samples"] = sampler.samples

    return watch


def components_report(samples: list[Report], traffic_s: float) -> Report:
    """Per component over the traffic: input and processed rates, lag over time and at
    the end of the traffic, CPU cores; per service, CPU cores."""
    during = [s for s in samples if s["t"] <= traffic_s + SAMPLE_S / 2] or samples
    first, last = during[0], during[-1]
    span = max(last["t"] - first["t"], 1e-9)
    out: Report = {}
    for name in INPUTS:
        a, b = first["offsets"][name], last["offsets"][name]
        input_rate = (b["end"] - a["end"]) / span
        lag_end = b["end"] - b["committed"]
        lag_s = lag_end / input_rate if input_rate > 0 else 0.0
        out[name] = {
            "input_per_s": round(input_rate, 1),
            "processed_per_s": round((b["committed"] - a["committed"]) / span, 1),
            "lag_at_end": lag_end,
            "lag_at_end_s_of_input": round(lag_s, 2),
            "kept_up": lag_s <= KEPT_UP_S,
            "lag": [
                [round(s["t"], 1), s["offsets"][name]["end"] - s["offsets"][name]["committed"]]
                for s in samples
            ],
        }
    for name in first["cpu_s"]:
        cores = (last["cpu_s"].get(name, 0.0) - first["cpu_s"][name]) / span
        out.setdefault(name, {})["cpu_cores"] = round(cores, 3)
    return out


def trainer_floor(settings: Settings, events: int = 8_192) -> float:
    """Examples/s of the served model trained in process, mini-batch by mini-batch, on
    simulated events with the trainer's torch threads: the trainer's step without Kafka,
    decoding or checkpoints."""
    import torch

    from camoe.sim.traffic import World
    from trainer.model import build_served_camoe
    from trainer.online import Examples, adam, train_steps

    history = World(settings.simulator).history(events, hours=0.0)
    model = build_served_camoe(settings)
    optimiser = adam(model, settings.trainer.online_learning_rate)
    x = Examples.unweighted(
        history["categorical"], history["numeric"], history["format"], history["label"]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.trainer.torch_threads)
    started = time.perf_counter()
    train_steps(model, optimiser, x, settings.trainer.online_batch_size)
    rate = events / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    return rate


def rate_settings(settings: Settings, rate: float, click_boost: float) -> Settings:
    """The demo's drifting traffic at ``rate`` requests/s with ``click_boost``."""
    from camoe.sim.loop import demo_settings

    s = demo_settings(settings)
    return s.model_copy(
        update={
            "simulator": s.simulator.model_copy(
                update={"requests_per_second": rate, "click_boost": click_boost}
            )
        }
    )


def measure(
    settings: Settings,
    rate: float,
    duration_s: float,
    click_boost: float,
    progress: Callable[[str], None],
) -> Report:
    """One rate: the loop, its components' rates, lag and CPU, and freshness."""
    from camoe.sim.loop import run_loop

    s = rate_settings(settings, rate, click_boost)
    watched: Report = {}
    summary = run_loop(s, duration_s, progress, report=reporter(30.0), watch=watcher(watched))
    loop = summary.pop("loop")
    summary.pop("watch", None)
    clicks = loop.get("clicks_trainable", 0)
    learned_share = loop["clicks_learned"] / clicks if clicks else 0.0
    components = components_report(watched.get("samples", []), duration_s)
    floor = trainer_floor(s)
    sustained = learned_share >= LEARNED_SHARE and all(
        components[name]["kept_up"] for name in INPUTS
    )
    return {
        "rate": rate,
        "click_boost": click_boost,
        "sustained": sustained,
        "clicks_trainable": clicks,
        "clicks_learned": loop["clicks_learned"],
        "learned_share": round(learned_share, 3),
        "freshness_s": loop.get("freshness_s"),
        "latest": loop.get("latest"),
        "components": components,
        "trainer": {
            "examples_per_s": loop.get("trainer_examples_per_s", 0.0),
            "floor_examples_per_s": round(floor, 1),
            "ratio_to_floor": round(loop.get("trainer_examples_per_s", 0.0) / floor, 3),
        },
        "traffic": summary,
        "freshness_report": loop,
        "sample_errors": watched.get("sample_errors", []),
    }


def run(
    settings: Settings,
    out: Path,
    rates: list[float],
    duration_s: float,
    click_boost: float = 1.0,
    progress: Callable[[str], None] = print,
) -> Report:
    """Measures the loop at each rate (one stack for all) and writes ``loop.json``,
    ``loop.png`` and ``lag.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings)
    started_here = stack.endpoints().kafka is None
    stack.up()
    results = []
    try:
        for rate in rates:
            progress(f"loop at {rate:.0f} requests/s for {duration_s:.0f}s")
            result = measure(settings, rate, duration_s, click_boost, progress)
            results.append(result)
            for line in rate_lines(result):
                progress(line)
    finally:
        if started_here:
            stack.down()
    sustained = [r["rate"] for r in results if r["sustained"]]
    report: Report = {
        "rates": results,
        "highest_sustained_rate": max(sustained) if sustained else None,
        "duration_s": duration_s,
        "kept_up_s": KEPT_UP_S,
        "learned_share_needed": LEARNED_SHARE,
        "settings": {
            "labeler": settings.labeler.model_dump(mode="json"),
            "trainer": {
                k: v
                for k, v in settings.trainer.model_dump(mode="json").items()
                if k != "checkpoint_dir"
            },
        },
    }
    (out / "loop.json").write_text(json.dumps(report, indent=2))
    for path in plot(results, out):
        progress(f"wrote {path}")
    progress(f"highest rate sustained: {report['highest_sustained_rate']}")
    progress(f"wrote {out / 'loop.json'}")
    return report


def rate_lines(result: Report) -> list[str]:
    c = result["components"]
    f = result["freshness_s"] or {}
    lines = [
        f"  {result['rate']:.0f}/s: {'sustained' if result['sustained'] else 'NOT sustained'};"
        f" freshness p50 {f.get('p50', float('nan'))}s p95 {f.get('p95', float('nan'))}s;"
        f" clicks learned {result['clicks_learned']} of {result['clicks_trainable']}"
        f" ({result['learned_share']:.0%})"
    ]
    for name in INPUTS:
        n = c[name]
        lines.append(
            f"    {name:>5}: in {n['input_per_s']:.0f}/s, done {n['processed_per_s']:.0f}/s,"
            f" lag at end {n['lag_at_end_s_of_input']:.1f}s of input,"
            f" {n.get('cpu_cores', float('nan')):.2f} cores"
        )
    t = result["trainer"]
    lines.append(
        f"    trainer {t['examples_per_s']:.0f} examples/s, floor {t['floor_examples_per_s']:.0f}"
        f" (x{t['ratio_to_floor']:.2f})"
    )
    return lines


def plot(results: list[Report], out: Path) -> list[Path]:
    plt = pyplot()

    if not results:
        return []
    rates = [r["rate"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for q in ("p50", "p95"):
        axes[0].plot(
            rates, [(r["freshness_s"] or {}).get(q, np.nan) for r in results], "o-", label=q
        )
    axes[0].set_title("freshness (click to a served version that learned it)")
    axes[0].set_ylabel("seconds")
    for name in INPUTS:
        axes[1].plot(
            rates,
            [r["components"][name]["lag_at_end_s_of_input"] for r in results],
            "o-",
            label=name,
        )
        axes[2].plot(
            rates,
            [r["components"][name].get("cpu_cores", np.nan) for r in results],
            "o-",
            label=name,
        )
    axes[1].axhline(KEPT_UP_S, color="grey", linestyle=":", label="keeping up")
    axes[1].set_title("consumer lag at the end of the traffic")
    axes[1].set_ylabel("seconds of input")
    axes[2].set_title("CPU per component")
    axes[2].set_ylabel("cores")
    for ax in axes:
        ax.set_xlabel("requests/s")
        ax.legend()
    fig.tight_layout()
    written = [save(fig, out / "loop.png")]

    fig, axes = plt.subplots(1, len(INPUTS), figsize=(15, 4))
    for ax, name in zip(axes, INPUTS, strict=True):
        for r in results:
            lag = np.asarray(r["components"][name]["lag"], dtype=float).reshape(-1, 2)
            ax.plot(lag[:, 0], lag[:, 1], label=f"{r['rate']:.0f}/s")
        ax.set_title(f"{name}: consumer lag")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("records")
        ax.legend()
    fig.tight_layout()
    written.append(save(fig, out / "lag.png"))
    return written
