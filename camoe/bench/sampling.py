"""``camoe bench sampling``: does negative down-sampling keep the served pCTR calibrated?

The question is the trainer's alone, so it is answered in process, side by side, with
nothing else moving. Per seed, version 1 is trained offline as the stack trains it; then
copies of it learn online, with the trainer's own mini-batch step (``train_steps``), from
one stream of the loop bench's world (its drifting traffic at 2,000 requests/s, at the
simulator's click rates) labelled as the labeler labels it in the configured
``labeler.feedback`` mode, with negatives sampled at each rate (by the labeler's own
hash, each kept one weighted ``1 / rate``). One copy is sampled without the weights, to
show what they correct.

At every publish (``trainer.publish_every_s``) each copy, trained on what has reached the
trainer by then, is scored on impressions of that moment against the simulator's click
probabilities (no label noise): ECE per format (the gap between mean pCTR and mean true
probability, over equal-count bins), the expected AUC-PR, and mean pCTR over mean true
probability; averaged over the publishes, these describe the pCTR served through the
run. The events trained and the training seconds are the cost.

In the stream, an impression's negative comes at its time (``fake-negative``) or when its
window closes (``window``), its click at the time of the click (with a delay drawn from
the simulator), in time order at the bench's request rate.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camoe.bench.figures import pyplot, save
from camoe.bench.quality import standard_error
from camoe.features import FORMATS
from camoe.settings import Settings
from camoe.sim.traffic import World
from consumers.labeler import keeps_negative
from trainer.metrics import ece, expected_auc_pr
from trainer.online import Examples, adam, predict, train_steps
from trainer.train import pretrain

Report = dict[str, Any]
RATES = (1.0, 0.3, 0.1, 0.03)
UNWEIGHTED_RATE = 0.1  # the arm sampled without importance weights
STREAM_RATE = 2000.0  # requests/s of the stream: the loop bench's target
CHECK_REQUESTS = 10_000  # impressions scored at each publish


def labelled_stream(
    history: dict[str, np.ndarray],
    rate: float,
    weighted: bool,
    fake_negative: bool,
    window_s: float,
    requests_per_second: float,
    delays_s: np.ndarray,
) -> tuple[Examples, np.ndarray]:
    """The labelled events of ``history`` (one served impression per row, in time order) as
    the labeler emits them, in the order they reach the trainer, and when (seconds).

    Args:
        history: ``World.history`` arrays.
        rate: the share of negatives kept; each weighs ``1 / rate`` when ``weighted``.
        weighted: whether kept negatives carry the importance weight.
        fake_negative: the labeler's mode (True: ``fake-negative``, False: ``window``).
        window_s: the attribution window.
        requests_per_second: the stream's rate (row i is served at ``i / rate``).
        delays_s: (N,) the delay each row's click would have.
    """
    n = len(history["label"])
    served = np.arange(n) / requests_per_second
    clicked = history["label"] == 1
    kept = np.fromiter((keeps_negative(f"r{i}", rate) for i in range(n)), bool, n)
    # A negative comes at once (fake-negative) or when the window closes without a click
    # (window: a click in the window labels its impression 1 instead; a later one is a
    # late positive); every click comes as a positive when it happens.
    negative = kept if fake_negative else kept & ~(clicked & (delays_s <= window_s))
    negative_at = served if fake_negative else served + window_s
    index = np.r_[np.flatnonzero(negative), np.flatnonzero(clicked)]
    at = np.r_[negative_at[negative], (served + delays_s)[clicked]]
    label = np.r_[np.zeros(negative.sum()), np.ones(clicked.sum())].astype(np.float32)
    weight = np.where(label == 0, 1.0 / rate if weighted else 1.0, 1.0).astype(np.float32)
    order = np.argsort(at, kind="stable")
    events = Examples(
        history["categorical"][index],
        history["numeric"][index],
        history["format"][index],
        label,
        weight,
        np.full(len(index), fake_negative),
    )
    return events.rows(order), at[order]


def score(model: torch.nn.Module, test: dict[str, np.ndarray]) -> Report:
    """ECE and expected AUC-PR per format against the true click probabilities."""
    x = Examples.unweighted(test["categorical"], test["numeric"], test["format"], test["label"])
    p = predict(model, x)
    out: Report = {}
    for k, name in enumerate(FORMATS):
        rows = test["format"] == k
        truth = test["true_ctr"][rows]
        out[name] = {
            "ece": ece(p[rows], truth),
            "auc_pr": expected_auc_pr(p[rows], truth),
            "pctr_over_true": float(p[rows].mean() / truth.mean()),
        }
    return out


def mean_scores(scores: list[Report]) -> Report:
    """Each format's metrics averaged over the checkpoints."""
    return {
        f: {m: round(float(np.mean([s[f][m] for s in scores])), 5) for m in scores[0][f]}
        for f in FORMATS
    }


def arms(rates: tuple[float, ...]) -> list[tuple[str, float, bool]]:
    """(name, rate, weighted) of every copy trained."""
    named = [(f"rate {r:g}", r, True) for r in rates]
    return [*named, (f"rate {UNWEIGHTED_RATE:g} unweighted", UNWEIGHTED_RATE, False)]


def run_seed(
    settings: Settings, seed: int, seconds: float, rates: tuple[float, ...]
) -> dict[str, Report]:
    """Every arm on one seed's world and ``seconds`` of its stream, each scored at every
    publish (``trainer.publish_every_s``) on impressions of that moment."""
    sim = settings.simulator.model_copy(update={"seed": settings.simulator.seed + seed})
    world = World(sim)
    requests = int(seconds * sim.requests_per_second)
    torch.manual_seed(seed)
    pretrained = pretrain(
        settings, world.history(settings.trainer.pretrain_requests, seed=1, hours=0.0)
    )
    history = world.history(requests, seed=2, hours=seconds / 3600)
    every = settings.trainer.publish_every_s
    moments = np.arange(every, seconds + 1e-9, every)
    tests = [
        world.history(CHECK_REQUESTS, seed=3 + k, hours=0.0, start_hours=t / 3600)
        for k, t in enumerate(moments)
    ]
    rng = np.random.default_rng(seed)
    delays = np.asarray([world.click_delay_s(rng) for _ in range(requests)])
    torch.set_num_threads(settings.trainer.torch_threads)
    results = {
        "version 1": {
            "formats": mean_scores([score(pretrained, test) for test in tests]),
            "events": 0,
            "train_s": 0.0,
        }
    }
    for name, rate, weighted in arms(rates):
        events, at = labelled_stream(
            history,
            rate,
            weighted,
            settings.labeler.feedback == "fake-negative",
            settings.labeler.attribution_window_s,
            sim.requests_per_second,
            delays,
        )
        model = copy.deepcopy(pretrained)
        optimiser = adam(model, settings.trainer.online_learning_rate)
        torch.manual_seed(seed)
        scores, trained, train_s = [], 0, 0.0
        for moment, test in zip(moments, tests, strict=True):
            # What has reached the trainer by this publish.
            upto = int(np.searchsorted(at, moment, side="right"))
            started = time.perf_counter()
            train_steps(
                model,
                optimiser,
                events.rows(slice(trained, upto)),
                settings.trainer.online_batch_size,
            )
            train_s += time.perf_counter() - started
            trained = upto
            scores.append(score(model, test))
        results[name] = {
            "formats": mean_scores(scores),
            "events": trained,
            "train_s": round(train_s, 2),
        }
    return results


def summarise(per_seed: list[dict[str, Report]]) -> Report:
    """Per arm: mean and standard error over seeds of each format's metrics, and the
    paired difference of its ECE from the unsampled arm's, seed by seed."""
    summary: Report = {}
    for arm in per_seed[0]:
        entry: Report = {
            "events": float(np.mean([s[arm]["events"] for s in per_seed])),
            "train_s": round(float(np.mean([s[arm]["train_s"] for s in per_seed])), 2),
        }
        for f in FORMATS:
            values = {
                m: np.asarray([s[arm]["formats"][f][m] for s in per_seed])
                for m in ("ece", "auc_pr", "pctr_over_true")
            }
            unsampled = np.asarray([s["rate 1"]["formats"][f]["ece"] for s in per_seed])
            paired = values["ece"] - unsampled
            entry[f] = {
                **{m: round(float(v.mean()), 5) for m, v in values.items()},
                **{f"{m}_se": round(standard_error(v) or 0.0, 5) for m, v in values.items()},
                "ece_minus_unsampled": round(float(paired.mean()), 5),
                "ece_minus_unsampled_se": round(standard_error(paired) or 0.0, 5),
            }
        summary[arm] = entry
    return summary


def run(
    settings: Settings,
    out: Path,
    seeds: int,
    seconds: float,
    rates: tuple[float, ...] = RATES,
    progress: Callable[[str], None] = print,
) -> Report:
    """Runs every arm on ``seeds`` worlds, each ``seconds`` of the loop bench's traffic at
    ``STREAM_RATE``, and writes ``sampling.json`` and ``sampling.png`` under ``out``."""
    from camoe.bench.loop import rate_settings

    settings = rate_settings(settings, STREAM_RATE, click_boost=1.0)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in range(seeds):
        started = time.perf_counter()
        per_seed.append(run_seed(settings, seed, seconds, rates))
        progress(f"seed {seed + 1}/{seeds} done in {time.perf_counter() - started:.0f}s")
    summary = summarise(per_seed)
    report: Report = {
        "summary": summary,
        "per_seed": per_seed,
        "seeds": seeds,
        "stream_s": seconds,
        "check_requests": CHECK_REQUESTS,
        "requests_per_second": STREAM_RATE,
        "feedback": settings.labeler.feedback,
        "online_batch_size": settings.trainer.online_batch_size,
        "online_learning_rate": settings.trainer.online_learning_rate,
    }
    (out / "sampling.json").write_text(json.dumps(report, indent=2))
    for line in table(summary):
        progress(line)
    progress(f"wrote {plot(summary, out / 'sampling.png')}")
    progress(f"wrote {out / 'sampling.json'}")
    return report


def table(summary: Report) -> list[str]:
    lines = [
        f"{'':24} {'events':>8} {'train s':>8}  "
        + "  ".join(f"{f + ' ECE':>16} {'AUC-PR':>7} {'p/true':>6}" for f in FORMATS)
    ]
    for arm, entry in summary.items():
        cells = "  ".join(
            f"{entry[f]['ece']:>8.4f} ±{entry[f]['ece_se']:.4f} {entry[f]['auc_pr']:>7.4f} "
            f"{entry[f]['pctr_over_true']:>6.2f}"
            for f in FORMATS
        )
        lines.append(f"{arm:24} {entry['events']:>8.0f} {entry['train_s']:>8.2f}  {cells}")
    return lines


def plot(summary: Report, path: Path) -> Path:
    """ECE and expected AUC-PR per format for each arm, with standard errors."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary)
    x = np.arange(len(names))
    width = 0.8 / len(FORMATS)
    for k, f in enumerate(FORMATS):
        for ax, metric in zip(axes, ("ece", "auc_pr"), strict=True):
            ax.bar(
                x + (k - 1) * width,
                [summary[a][f][metric] for a in names],
                width,
                yerr=[summary[a][f][f"{metric}_se"] for a in names],
                label=f,
            )
    axes[0].axhline(0.005, color="black", linestyle="--", linewidth=1, label="0.005")
    for ax, title in zip(axes, ("ECE vs the true probabilities", "expected AUC-PR"), strict=True):
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("online learning with negatives sampled at each rate (weight 1/rate)")
    fig.tight_layout()
    return save(fig, path)
