"""Quality benchmark: CAMoE against its baselines on the same data.

Two datasets: ``simulator`` (per seed, a time-ordered history of ``bench.requests``
impressions over ``bench.hours``, drift included, the tasks being the ad formats) and
``movielens-100k`` (real ratings in three domains by user age, the tasks being the
domains: camoe/bench/movielens.py; the seed varies the models' initialisation and
order only). Each is split in time into train / calibration / test; every model is
trained on the train part, its per-task Platt calibration fitted on the calibration
part, and the test part scored. Metrics per task: AUC-PR (average
precision), ROC-AUC, log loss and ECE (15 equal-mass bins: with CTRs of a few percent,
equal-width bins would put nearly every impression in the first bin) against the sampled
labels, and, on the simulator, AUC-PR and ECE against its click probabilities
(``expected_auc_pr``, ``expected_ece``): no label noise, so they separate models that
the few hundred clicks of a format's test split cannot.

Models are compared with CAMoE seed by seed (same data, same splits): the paired
difference of AUC-PR and ECE (the expected ones where the true probabilities are known),
its mean and standard error over seeds. A model **dominates** CAMoE when its AUC-PR is
higher by more than ``DOMINANCE_SE`` standard errors on at least one task and lower by
more than that on none.

Writes ``quality.json`` (mean and std over seeds, the paired differences, the models
that dominate CAMoE), ``quality.md`` (a table), ``pareto.png`` (AUC-PR per pair of tasks)
and ``calibration.png``.
"""

from __future__ import annotations

import functools
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

from camoe.bench import movielens
from camoe.bench.figures import pyplot, save
from camoe.features import CONTENT_TYPES, FORMATS, FeatureLayout
from camoe.settings import Settings
from camoe.sim.traffic import World
from trainer.baselines import ContentMMoE, GlobalDCN, MMoE, SharedBottom, SingleTaskDCN
from trainer.metrics import METRICS, ece, expected_auc_pr, format_metrics
from trainer.model import CAMoE, ServingModel
from trainer.modules import Calibrated
from trainer.train import LossKind, calibrate, fit, task_of

log = logging.getLogger(__name__)

EXPECTED = ("expected_auc_pr", "expected_ece")  # against the true click probabilities
BENCH_METRICS = (*METRICS, *EXPECTED)
DOMINANCE_SE = 2.0
DATASETS = ("simulator", "movielens-100k")


@dataclass(frozen=True)
class Dataset:
    """What the models are built for: the tasks (one tower each, by ``format`` index),
    CAMoE's task groups, the categorical vocabularies and the numeric width; whether the
    true click probabilities are known; the models that apply."""

    name: str
    tasks: tuple[str, ...]
    groups: list[list[str]]
    cards: list[int]
    n_numeric: int
    has_truth: bool
    models: list[str]


Builder = Callable[[Settings, Dataset], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    build: Builder
    loss: LossKind
    off_task_weight: float = 0.0  # soft masking (trainer.model.masked_bce)


def _camoe(**overrides: Any) -> Builder:
    def build(settings: Settings, data: Dataset) -> nn.Module:
        params = {**settings.model.model_dump(), "groups": data.groups, **overrides}
        return CAMoE(data.cards, data.n_numeric, list(data.tasks), **params)

    return build


def _no_grouping(settings: Settings, data: Dataset) -> nn.Module:
    # Same expert budget as CAMoE, in one pool that every task's gate sees.
    experts = settings.model.experts_per_group * len(data.groups)
    return _camoe(groups=[list(data.tasks)], experts_per_group=experts)(settings, data)


def _baseline(cls: type[nn.Module], **kwargs: Any) -> Builder:
    def build(settings: Settings, data: Dataset) -> nn.Module:
        dim = settings.model.embedding_dim
        return cls(data.cards, data.n_numeric, len(data.tasks), dim, **kwargs)

    return build


def _experts(settings: Settings, data: Dataset) -> int:
    return settings.model.shared_experts + settings.model.experts_per_group * len(data.groups)


MODELS: dict[str, ModelSpec] = {
    "camoe": ModelSpec(_camoe(), "masked"),
    "dcn_global": ModelSpec(_baseline(GlobalDCN), "pooled"),
    "dcn_single_task": ModelSpec(_baseline(SingleTaskDCN), "masked"),
    "shared_bottom": ModelSpec(_baseline(SharedBottom), "masked"),
    "mmoe": ModelSpec(
        lambda s, d: MMoE(
            d.cards, d.n_numeric, len(d.tasks), s.model.embedding_dim, _experts(s, d)
        ),
        "masked",
    ),
    # Tasks by the simulator's content types, so on the simulator only.
    "content_mmoe": ModelSpec(
        lambda s, d: ContentMMoE(
            d.cards, d.n_numeric, len(CONTENT_TYPES), s.model.embedding_dim, _experts(s, d)
        ),
        "masked",
    ),
    "camoe_no_grouping": ModelSpec(_no_grouping, "masked"),
    "camoe_no_masking": ModelSpec(_camoe(), "all_tasks"),
    "camoe_soft_masking": ModelSpec(_camoe(), "masked", off_task_weight=0.25),
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
    name: str,
    settings: Settings,
    dataset: Dataset,
    splits: tuple[dict[str, np.ndarray], ...],
    seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Trains, calibrates and evaluates one model; returns (result, test predictions)."""
    train, calib, test = splits
    spec = MODELS[name]
    torch.manual_seed(seed)
    inner = spec.build(settings, dataset)
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
        off_task_weight=spec.off_task_weight,
    )
    seconds = time.perf_counter() - started
    n_tasks = len(CONTENT_TYPES) if isinstance(inner, ContentMMoE) else len(dataset.tasks)
    model = Calibrated(inner, n_tasks).eval()
    calibrate(model, calib)
    p = predict(model, test)
    result: dict[str, Any] = {
        "examples_per_s": len(train["label"]) * b.epochs / seconds,
        "formats": per_task(p, test, dataset.tasks),
    }
    return result, p


def per_task(
    p: np.ndarray, test: dict[str, np.ndarray], tasks: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """Each task's metrics of ``p`` against the labels and, where ``test`` has them
    (``true_ctr``), against the true click probabilities (else NaN)."""
    out = {}
    for k, task in enumerate(tasks):
        rows = test["format"] == k
        truth = test["true_ctr"][rows] if "true_ctr" in test else None
        known = truth is not None and rows.any()
        out[task] = {
            **format_metrics(p[rows], test["label"][rows]),
            "expected_auc_pr": expected_auc_pr(p[rows], truth) if known else float("nan"),
            "expected_ece": ece(p[rows], truth) if known else float("nan"),
        }
    return out


def forward_throughput(
    settings: Settings, batches: tuple[int, ...] = (1, 64, 1024), seconds: float = 1.0
) -> dict[str, float]:
    """In-process CAMoE forward, candidates/s per batch size (the serving floor)."""
    layout = FeatureLayout(settings.features.n_campaigns)
    simulated = dataset_for(settings, "simulator")
    model = ServingModel(Calibrated(_camoe()(settings, simulated), len(FORMATS))).eval()
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


def dataset_for(settings: Settings, name: str) -> Dataset:
    """The models' view of dataset ``name`` (one of ``DATASETS``)."""
    if name == "simulator":
        layout = FeatureLayout(settings.features.n_campaigns)
        return Dataset(
            name,
            FORMATS,
            settings.model.groups,
            [f.cardinality for f in layout.categorical],
            layout.n_numeric,
            has_truth=True,
            models=settings.bench.models,
        )
    if name == "movielens-100k":
        data = _ratings(settings.bench.requests)
        return Dataset(
            name,
            movielens.DOMAINS,
            # No modalities to group by: each domain a group of its own, under the shared
            # experts (PLE's layout).
            [[d] for d in movielens.DOMAINS],
            movielens.cardinalities(data),
            data["numeric"].shape[1],
            has_truth=False,
            models=[m for m in settings.bench.models if m != "content_mmoe"],
        )
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


@functools.lru_cache(maxsize=1)
def _ratings(limit: int) -> dict[str, np.ndarray]:
    """MovieLens read once per run: every seed trains on the same data."""
    return movielens.load(limit=limit)


def _data(settings: Settings, dataset: Dataset, seed: int) -> dict[str, np.ndarray]:
    if dataset.name == "simulator":
        sim = settings.simulator.model_copy(update={"seed": settings.simulator.seed + seed})
        return World(sim).history(settings.bench.requests, seed=seed, hours=settings.bench.hours)
    return _ratings(settings.bench.requests)


def run(
    settings: Settings,
    out: Path,
    seeds: int,
    progress: Callable[[str], None] = print,
    dataset: str = "simulator",
) -> dict[str, Any]:
    """The whole benchmark on ``dataset``; writes the JSON, the table and the plots under
    ``out``."""
    unknown = [n for n in settings.bench.models if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    data_spec = dataset_for(settings, dataset)
    out.mkdir(parents=True, exist_ok=True)
    names = data_spec.models
    per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    oracle: list[dict[str, Any]] = []
    compared = "expected_auc_pr" if data_spec.has_truth else "auc_pr"
    for seed in range(seeds):
        started = time.perf_counter()
        data = _data(settings, data_spec, seed)
        splits = _split(data, settings)
        progress(
            f"seed {seed + 1}/{seeds}: {len(data['label'])} {dataset} examples "
            f"(positive rate {data['label'].mean():.4f}) in {time.perf_counter() - started:.0f}s"
        )
        test = splits[2]
        if data_spec.has_truth:
            oracle.append({"formats": per_task(test["true_ctr"], test, data_spec.tasks)})
        for name in names:
            result, p = run_model(name, settings, data_spec, splits, seed)
            per_seed[name].append(result)
            if seed == 0:
                curves[name] = (p, test["label"], test["format"])
            auc = " ".join(f"{t} {result['formats'][t][compared]:.4f}" for t in data_spec.tasks)
            progress(f"  {name:<18} {compared} {auc}  ({result['examples_per_s']:.0f} ex/s)")
    summary = summarise(per_seed, oracle, seeds, settings, data_spec)
    summary["forward_candidates_per_s"] = forward_throughput(settings)  # the served model
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    (out / "quality.md").write_text(table(summary))
    plot_pareto(summary, out / "pareto.png")
    plot_calibration(curves, data_spec.tasks, out / "calibration.png")
    progress(f"written: {out / 'quality.json'}, quality.md, pareto.png, calibration.png")
    return summary


def summarise(
    per_seed: dict[str, list[dict[str, Any]]],
    oracle: list[dict[str, Any]],
    seeds: int,
    settings: Settings,
    dataset: Dataset,
) -> dict[str, Any]:
    """``oracle``: the metrics of the simulator's true CTR, the ceiling for any model
    (none on real data)."""
    tasks = dataset.tasks
    models = {
        name: {
            "formats": _aggregate(results, tasks),
            "train_examples_per_s": float(np.mean([r["examples_per_s"] for r in results])),
        }
        for name, results in per_seed.items()
    }
    metrics = EXPECTED if dataset.has_truth else ("auc_pr", "ece")
    paired = paired_differences(per_seed, "camoe", tasks, metrics) if "camoe" in per_seed else {}
    return {
        "dataset": dataset.name,
        "tasks": list(tasks),
        "groups": dataset.groups,
        "seeds": seeds,
        "requests_per_seed": settings.bench.requests if dataset.has_truth else None,
        "split": {
            "train": 1 - settings.bench.test_fraction - settings.bench.calibration_fraction,
            "calibration": settings.bench.calibration_fraction,
            "test": settings.bench.test_fraction,
        },
        "simulator": settings.simulator.model_dump() if dataset.has_truth else None,
        "models": models,
        "oracle": {"formats": _aggregate(oracle, tasks)} if oracle else None,
        "compared_metrics": list(metrics),
        "paired_with_camoe": paired,
        "dominating_camoe": [name for name, d in paired.items() if dominates(d, metrics[0])],
    }


def _aggregate(results: list[dict[str, Any]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Mean and std over seeds of each metric of each task (NaN where undefined)."""
    out: dict[str, Any] = {}
    for t in tasks:
        out[t] = {}
        for m in BENCH_METRICS:
            v = np.array([r["formats"][t][m] for r in results], dtype=np.float64)
            finite = np.isfinite(v).any()
            out[t][m] = {
                "mean": float(np.nanmean(v)) if finite else float("nan"),
                "std": float(np.nanstd(v)) if finite else float("nan"),
            }
    return out


def paired_differences(
    per_seed: dict[str, list[dict[str, Any]]],
    reference: str,
    tasks: tuple[str, ...] = FORMATS,
    metrics: tuple[str, ...] = EXPECTED,
) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """For each other model, task and metric: the mean over seeds of (model -
    ``reference``), seed by seed, and its standard error (None with one seed)."""
    out: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    for name, results in per_seed.items():
        if name == reference:
            continue
        out[name] = {}
        for f in tasks:
            out[name][f] = {}
            for m in metrics:
                d = np.array(
                    [
                        r["formats"][f][m] - ref["formats"][f][m]
                        for r, ref in zip(results, per_seed[reference], strict=True)
                    ]
                )
                out[name][f][m] = {"mean": float(d.mean()), "se": standard_error(d)}
    return out


def standard_error(values: np.ndarray) -> float | None:
    """The standard error of the mean of ``values`` (None for fewer than two)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def dominates(
    paired: dict[str, dict[str, dict[str, float | None]]], metric: str = "expected_auc_pr"
) -> bool:
    """Whether a model's paired ``metric`` differences from CAMoE (model - CAMoE), one per
    task, dominate it: higher beyond ``DOMINANCE_SE`` standard errors on a task, lower
    beyond them on none. Without standard errors (one seed) nothing is judged."""
    gaps = [by_metric[metric] for by_metric in paired.values()]
    if any(g["se"] is None for g in gaps):
        return False
    beyond = [(g["mean"], DOMINANCE_SE * float(g["se"] or 0.0)) for g in gaps]
    return any(d > bound for d, bound in beyond) and not any(d < -bound for d, bound in beyond)


def table(summary: dict[str, Any]) -> str:
    """Per model and task: AUC-PR and ECE (against the true probabilities where they are
    known), the paired difference of that AUC-PR from CAMoE (± standard error), and
    AUC-PR against the sampled labels."""
    tasks = summary["tasks"]
    auc, ece_metric = summary["compared_metrics"]
    truth = " (true p)" if auc == "expected_auc_pr" else ""
    header = (
        "| model | "
        + " | ".join(
            f"{t} AUC-PR{truth} | {t} minus CAMoE | {t} ECE{truth} | {t} AUC-PR (labels)"
            for t in tasks
        )
        + " | train ex/s |"
    )
    lines = [header, "|" + " --- |" * (4 * len(tasks) + 2)]
    paired = summary.get("paired_with_camoe", {})
    rows = list(summary["models"].items())
    if summary.get("oracle"):
        rows.append(("oracle (true CTR)", summary["oracle"]))
    for name, result in rows:
        cells = []
        for t in tasks:
            m = result["formats"][t]
            cells.append(f"{m[auc]['mean']:.4f}")
            gap = paired.get(name, {}).get(t, {}).get(auc)
            if gap is None:
                cells.append("-")
            else:
                se = "" if gap["se"] is None else f" ± {gap['se']:.4f}"
                cells.append(f"{gap['mean']:+.4f}{se}")
            cells.append(f"{m[ece_metric]['mean']:.4f}")
            cells.append(f"{m['auc_pr']['mean']:.4f} ± {m['auc_pr']['std']:.4f}")
        speed = result.get("train_examples_per_s")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed or 0:.0f} |")
    return "\n".join(lines) + "\n"


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    tasks = summary["tasks"]
    auc = summary["compared_metrics"][0]
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.8))
    for ax, (fx, fy) in zip(axes, pairs, strict=True):
        for name, result in summary["models"].items():
            x = result["formats"][fx][auc]
            y = result["formats"][fy][auc]
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
        against = " against the true probabilities" if auc == "expected_auc_pr" else ""
        ax.set_xlabel(f"{fx} AUC-PR{against}")
        ax.set_ylabel(f"{fy} AUC-PR{against}")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"AUC-PR per format, mean ± std over {summary['seeds']} seeds (up and right is better)"
    )
    fig.tight_layout()
    save(fig, path)


def plot_calibration(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    tasks: tuple[str, ...],
    path: Path,
    bins: int = 10,
) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(tasks), figsize=(15, 4.8))
    for k, (ax, f) in enumerate(zip(axes, tasks, strict=True)):
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
