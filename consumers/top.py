"""``camoe top``: a live terminal view of a scoring process, read from its /metrics."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

STAGE, END_TO_END = "camoe_scoring_stage_seconds", "camoe_scoring_end_to_end_seconds"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of every metric at ``url``: name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for tags, v in samples.get(name, []) if all(tags.get(k) == x for k, x in labels.items())
    )


def quantile(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, q: float, **labels: str
) -> float:
    """The bucket bound under which a fraction ``q`` of a histogram's observations fall."""
    buckets = sorted(
        (float(tags["le"]), v)
        for tags, v in samples.get(f"{name}_bucket", [])
        if all(tags.get(k) == x for k, x in labels.items())
    )
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


def render(
    now: dict[str, list[tuple[dict[str, str], float]]],
    before: dict[str, list[tuple[dict[str, str], float]]] | None,
    seconds: float,
) -> str:
    """One screen: rates since the previous scrape, latency quantiles since start."""

    def rate(name: str) -> float:
        if before is None or seconds <= 0:
            return 0.0
        return (_value(now, name) - _value(before, name)) / seconds

    lines = [
        f"model version {_value(now, 'camoe_scoring_model_version'):.0f}   "
        f"requests {_value(now, 'camoe_scoring_requests_total'):.0f} "
        f"({rate('camoe_scoring_requests_total'):.0f}/s)   "
        f"candidates {rate('camoe_scoring_candidates_total'):.0f}/s",
        f"dead letters {_value(now, 'camoe_scoring_dead_letters_total'):.0f}   "
        f"fallback requests {_value(now, 'camoe_scoring_fallback_requests_total'):.0f}",
        "latency (ms, bucket bound)     p50      p99",
    ]
    for stage in ("features", "inference", "total"):
        lines.append(
            f"  {stage:<26}{1000 * quantile(now, STAGE, 0.5, stage=stage):8g}"
            f" {1000 * quantile(now, STAGE, 0.99, stage=stage):8g}"
        )
    lines.append(
        f"  {'end to end':<26}{1000 * quantile(now, END_TO_END, 0.5):8g}"
        f" {1000 * quantile(now, END_TO_END, 0.99):8g}"
    )
    return "\n".join(lines)


def watch(url: str, every_s: float, show: Callable[[str], None], rounds: int | None = None) -> None:
    """Scrapes ``url`` every ``every_s`` and shows the view (``rounds`` times, or forever)."""
    before, then = None, time.monotonic()
    done = 0
    while rounds is None or done < rounds:
        now, at = scrape(url), time.monotonic()
        show(render(now, before, at - then))
        before, then = now, at
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every_s)
