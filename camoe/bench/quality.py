"""Quality benchmark: CAMoE against its baselines on the same simulated stream.

For each seed: simulate a time-ordered history (``bench.requests`` impressions over
``bench.hours``, drift included), split it in time into train / calibration / test,
train every model on the train part, fit its per-task Platt calibration on the
calibration part, and score the test part. Metrics per ad format: AUC-PR (average
precision), ROC-AUC, log loss and ECE (15 equal-mass bins: with CTRs of a few percent,
equal-width bins would put nearly every impression in the first bin).

Writes ``quality.json`` (mean and std over seeds), ``quality.md`` (a table),
``pareto.png`` (AUC-PR per pair of formats) and ``calibration.png``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camoe.bench.figures import pyplot, save
from camoe.features import CONTENT_TYPES, FORMATS, FeatureLayout
from camoe.settings import Settings
from camoe.sim.traffic import World
from trainer.baselines import ContentMMoE, GlobalDCN, MMoE, SharedBottom, SingleTaskDCN
from trainer.metrics import METRICS, per_format
from trainer.model import CAMoE, ServingModel
from trainer.modules import Calibrated
from trainer.train import LossKind, calibrate, fit, task_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[Settings, list[int], int], nn.Module]
    loss: LossKind


def _camoe(**overrides: Any) -> Callable[[Settings, list[int], int], nn.Module]:
    def build(settings: Settings, cards: list[int], n_numeric: int) -> nn.Module:
        params = {**settings.model.model_dump(), **overrides}
        return CAMoE(cards, n_numeric, list(FORMATS), **params)

    return build


def _no_grouping(settings: Settings, cards: list[int], n_numeric: int) -> nn.Module:
    m = settings.model
    # Same expert budget as CAMoE, in one pool that every task's gate sees.
    experts = m.experts_per_group * len(m.groups)
    return _camoe(groups=[list(FORMATS)], experts_per_group=experts)(settings, cards, n_numeric)


def _baseline(cls: type[nn.Module], **kwargs: Any) -> Callable[..., nn.Module]:
    def build(settings: Settings, cards: list[int], n_numeric: int) -> nn.Module:
        return cls(cards, n_numeric, len(FORMATS), settings.model.embedding_dim, **kwargs)

    return build


def _experts(settings: Settings) -> int:
    m = settings.model
    return m.shared_experts + m.experts_per_group * len(m.groups)


MODELS: dict[str, ModelSpec] = {
    "camoe": ModelSpec(_camoe(), "masked"),
    "dcn_global": ModelSpec(_baseline(GlobalDCN), "pooled"),
    "dcn_single_task": ModelSpec(_baseline(SingleTaskDCN), "masked"),
    "shared_bottom": ModelSpec(_baseline(SharedBottom), "masked"),
    "mmoe": ModelSpec(
        lambda s, c, n: MMoE(c, n, len(FORMATS), s.model.embedding_dim, _experts(s)), "masked"
    ),
    "content_mmoe": ModelSpec(
        lambda s, c, n: ContentMMoE(c, n, len(CONTENT_TYPES), s.model.embedding_dim, _experts(s)),
        "masked",
    ),
    "camoe_no_grouping": ModelSpec(_no_grouping, "masked"),
    "camoe_no_masking": ModelSpec(_camoe(), "all_tasks"),
    "camoe_no_dcn": ModelSpec(_camoe(cross_layers=0), "masked"),
}


def _split(data: dict[str, np.ndarray], settings: Settings) -> tuple[dict[str, np.ndarray], ...]:
    n = len(data["label"])
    b = settings.bench
    train_end = int(n * (1 - b.test_fraction - b.calibration_fraction))
    calib_end = int(n * (1 - b.test_fraction))
    parts = [(0, train_end), (train_end, calib_end), (calib_end, n)]
    return tuple({k: v[s:e] for k, v in data.items()} for s, e in parts)


def predict(model: Calibrated, data: dict[str, np.ndarray]) -> np.ndarray:
    categorical = torch.from_numpy(data["categorical"])
    fmt = torch.from_numpy(data["format"])
    task = task_of(model, categorical, fmt).view(-1, 1)
    with torch.no_grad():
        logits = model(categorical, torch.from_numpy(data["numeric"]))
        return torch.sigmoid(logits.gather(1, task)).view(-1).numpy()


def run_model(
    name: str, settings: Settings, splits: tuple[dict[str, np.ndarray], ...], seed: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Trains, calibrates and evaluates one model; returns (result, test predictions)."""
    train, calib, test = splits
    layout = FeatureLayout(settings.features.n_campaigns)
    spec = MODELS[name]
    torch.manual_seed(seed)
    inner = spec.build(settings, [f.cardinality for f in layout.categorical], layout.n_numeric)
    b = settings.bench
    started = time.perf_counter()
    fit(
        inner,
        train,
        epochs=b.epochs,
        batch_size=b.batch_size,
        learning_rate=b.learning_rate,
        seed=seed,
        loss=spec.loss,
    )
    seconds = time.perf_counter() - started
    n_tasks = len(CONTENT_TYPES) if isinstance(inner, ContentMMoE) else len(FORMATS)
    model = Calibrated(inner, n_tasks).eval()
    calibrate(model, calib)
    p = predict(model, test)
    result: dict[str, Any] = {
        "examples_per_s": len(train["label"]) * b.epochs / seconds,
        "formats": per_format(p, test["label"], test["format"]),
    }
    return result, p


def forward_throughput(
    settings: Settings, batches: tuple[int, ...] = (1, 64, 1024), seconds: float = 1.0
) -> dict[str, float]:
    """In-process CAMoE forward, candidates/s per batch size (the serving floor)."""
    layout = FeatureLayout(settings.features.n_campaigns)
    model = ServingModel(
        Calibrated(
            _camoe()(settings, [f.cardinality for f in layout.categorical], layout.n_numeric),
            len(FORMATS),
        )
    ).eval()
    out = {}
    for batch in batches:
        inputs = (
            torch.zeros(batch, layout.n_categorical, dtype=torch.int64),
            torch.randn(batch, layout.n_numeric),
            torch.zeros(batch, 1, dtype=torch.int64),
        )
        with torch.inference_mode():
            model(*inputs)
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                model(*inputs)
                n += batch
        out[str(batch)] = n / (time.perf_counter() - started)
    return out


def run(
    settings: Settings, out: Path, seeds: int, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """The whole benchmark; writes the JSON, the table and the plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = settings.bench.models
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    oracle: list[dict[str, Any]] = []
    for seed in range(seeds):
        sim = settings.simulator.model_copy(update={"seed": settings.simulator.seed + seed})
        started = time.perf_counter()
        data = World(sim).history(settings.bench.requests, seed=seed, hours=settings.bench.hours)
        splits = _split(data, settings)
        progress(
            f"seed {seed + 1}/{seeds}: simulated {len(data['label'])} impressions "
            f"(CTR {data['label'].mean():.4f}) in {time.perf_counter() - started:.0f}s"
        )
        test = splits[2]
        oracle.append({"formats": per_format(test["true_ctr"], test["label"], test["format"])})
        for name in names:
            result, p = run_model(name, settings, splits, seed)
            per_seed[name].append(result)
            if seed == 0:
                curves[name] = (p, splits[2]["label"], splits[2]["format"])
            auc = " ".join(f"{f} {result['formats'][f]['auc_pr']:.4f}" for f in FORMATS)
            progress(f"  {name:<18} AUC-PR {auc}  ({result['examples_per_s']:.0f} ex/s)")
    summary = summarise(per_seed, oracle, seeds, settings)
    summary["forward_candidates_per_s"] = forward_throughput(settings)
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    (out / "quality.md").write_text(table(summary))
    plot_pareto(summary, out / "pareto.png")
    plot_calibration(curves, out / "calibration.png")
    progress(f"written: {out / 'quality.json'}, quality.md, pareto.png, calibration.png")
    return summary


def summarise(
    per_seed: dict[str, list[dict[str, Any]]],
    oracle: list[dict[str, Any]],
    seeds: int,
    settings: Settings,
) -> dict[str, Any]:
    """``oracle``: the metrics of the simulator's true CTR, the ceiling for any model."""
    models = {
        name: {
            "formats": _aggregate(results),
            "train_examples_per_s": float(np.mean([r["examples_per_s"] for r in results])),
        }
        for name, results in per_seed.items()
    }
    return {
        "seeds": seeds,
        "requests_per_seed": settings.bench.requests,
        "split": {
            "train": 1 - settings.bench.test_fraction - settings.bench.calibration_fraction,
            "calibration": settings.bench.calibration_fraction,
            "test": settings.bench.test_fraction,
        },
        "simulator": settings.simulator.model_dump(),
        "models": models,
        "oracle": {"formats": _aggregate(oracle)},
    }


def _aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of each metric of each format."""
    return {
        f: {
            m: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v))}
            for m in METRICS
            for v in [np.array([r["formats"][f][m] for r in results])]
        }
        for f in FORMATS
    }


def table(summary: dict[str, Any]) -> str:
    header = "| model | " + " | ".join(f"{f} AUC-PR | {f} ECE" for f in FORMATS) + " | train ex/s |"
    lines = [header, "|" + " --- |" * (2 * len(FORMATS) + 2)]
    rows = [*summary["models"].items(), ("oracle (true CTR)", summary["oracle"])]
    for name, result in rows:
        cells = []
        for f in FORMATS:
            m = result["formats"][f]
            cells.append(f"{m['auc_pr']['mean']:.4f} ± {m['auc_pr']['std']:.4f}")
            cells.append(f"{m['ece']['mean']:.4f}")
        speed = result.get("train_examples_per_s")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed or 0:.0f} |")
    return "\n".join(lines) + "\n"


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    pairs = [("audio", "video"), ("audio", "display"), ("video", "display")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (fx, fy) in zip(axes, pairs, strict=True):
        for name, result in summary["models"].items():
            x = result["formats"][fx]["auc_pr"]
            y = result["formats"][fy]["auc_pr"]
            camoe = name == "camoe"
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=x["std"],
                yerr=y["std"],
                fmt="*" if camoe else "o",
                markersize=14 if camoe else 6,
                color="crimson" if camoe else None,
                capsize=2,
            )
            ax.annotate(
                name, (x["mean"], y["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlabel(f"{fx} AUC-PR")
        ax.set_ylabel(f"{fy} AUC-PR")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"AUC-PR per format, mean ± std over {summary['seeds']} seeds (up and right is better)"
    )
    fig.tight_layout()
    save(fig, path)


def plot_calibration(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, bins: int = 10
) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(FORMATS), figsize=(15, 4.8))
    for k, (ax, f) in enumerate(zip(axes, FORMATS, strict=True)):
        for name in [n for n in ("camoe", "dcn_global", "mmoe") if n in curves]:
            p, y, fmt = curves[name]
            p, y = p[fmt == k], y[fmt == k]
            if not len(p):
                continue
            chunks = np.array_split(np.argsort(p), bins)
            ax.plot(
                [p[c].mean() for c in chunks], [y[c].mean() for c in chunks], marker="o", label=name
            )
        top = ax.get_xlim()[1]
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{f}: observed vs predicted CTR")
        ax.set_xlabel("mean predicted CTR (equal-mass bins)")
        ax.set_ylabel("observed CTR")
        ax.legend()
    fig.tight_layout()
    save(fig, path)
