"""A tiny end-to-end run of the quality benchmark (camoe/bench/quality.py) and unit tests of its
ECE. CPU only, no services. It checks what the benchmark writes, never which model wins."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from camoe.bench import quality
from camoe.features import FORMATS
from camoe.settings import Settings
from trainer.metrics import ece, per_format

MODELS = ["camoe", "dcn_global", "content_mmoe"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    settings = Settings(
        bench={"requests": 4000, "epochs": 1, "seeds": 1, "models": MODELS},
        # more clicks, so every format's test split has positives and metrics are defined
        simulator={"click_boost": 2.0},
    )
    lines: list[str] = []
    summary = quality.run(settings, out=out, seeds=1, progress=lines.append)
    return out, summary, lines


def test_run_reports_progress_and_writes_every_output(bench_run):
    out, _, lines = bench_run
    assert lines and "written" in lines[-1]
    for name in ("quality.json", "quality.md", "pareto.png", "calibration.png"):
        assert (out / name).is_file(), name


def _check_metrics(formats, where):
    """Every format has every metric as finite mean and std, each in its valid range."""
    assert set(formats) == set(FORMATS), where
    for f in FORMATS:
        metrics = formats[f]
        assert set(metrics) == set(quality.BENCH_METRICS), (where, f)
        for metric, stats in metrics.items():
            assert set(stats) == {"mean", "std"}, (where, f, metric)
            mean, std = stats["mean"], stats["std"]
            assert math.isfinite(mean) and math.isfinite(std), (where, f, metric)
            assert std >= 0
            if metric == "logloss":
                assert mean > 0, (where, f)
            else:
                assert 0 <= mean <= 1, (where, f, metric, mean)


def test_quality_json_has_every_metric_of_every_model_and_format(bench_run):
    out, summary, _ = bench_run
    data = json.loads((out / "quality.json").read_text())
    assert data["seeds"] == 1
    assert data["requests_per_seed"] == 4000
    assert list(data["models"]) == MODELS
    assert data["models"] == json.loads(json.dumps(summary["models"]))
    for name in MODELS:
        result = data["models"][name]
        _check_metrics(result["formats"], name)
        speed = result["train_examples_per_s"]
        assert math.isfinite(speed) and speed > 0
    if "oracle" in data:  # the simulator's true CTR, when the benchmark reports it
        _check_metrics(data["oracle"]["formats"], "oracle")


def test_quality_json_reports_forward_throughput_per_batch_size(bench_run):
    out, _, _ = bench_run
    throughput = json.loads((out / "quality.json").read_text())["forward_candidates_per_s"]
    assert set(throughput) == {"1", "64", "1024"}
    assert all(math.isfinite(v) and v > 0 for v in throughput.values())


def test_quality_md_is_a_table_with_one_row_per_model(bench_run):
    out, _, _ = bench_run
    lines = (out / "quality.md").read_text().strip().splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    header, separator, *rows = lines
    columns = header.count("|")
    assert set(separator.replace("|", "").split()) == {"---"}
    assert separator.count("|") == columns
    names = [row.split("|")[1].strip() for row in rows]
    assert names[: len(MODELS)] == MODELS
    # after the models, at most a reference row (the simulator's true CTR)
    assert all(name.startswith("oracle") for name in names[len(MODELS) :]), names
    assert len(names) <= len(MODELS) + 1
    assert all(row.count("|") == columns for row in rows)


@pytest.mark.parametrize("name", ["pareto.png", "calibration.png"])
def test_plots_are_png_images(bench_run, name):
    out, _, _ = bench_run
    content = (out / name).read_bytes()
    assert content[:8] == PNG_SIGNATURE
    assert len(content) > 10_000


def test_run_rejects_an_unknown_model(tmp_path):
    settings = Settings(bench={"requests": 100, "models": ["camoe", "xgboost"]})
    with pytest.raises(ValueError, match="xgboost"):
        quality.run(settings, out=tmp_path, seeds=1, progress=lambda _: None)
    assert not (tmp_path / "quality.json").exists()


# --- ece --------------------------------------------------------------------------------


def test_ece_of_predictions_equal_to_each_bins_rate_is_zero():
    bins, per_bin = 15, 200
    clicks = 5 * np.arange(1, bins + 1)  # per bin: rates 0.025 .. 0.375, distinct
    p = np.repeat(clicks / per_bin, per_bin)
    y = np.concatenate([(np.arange(per_bin) < c).astype(float) for c in clicks])
    order = np.random.default_rng(0).permutation(len(p))  # input order must not matter
    assert ece(p[order], y[order], bins=bins) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_constant_wrong_prediction_is_its_distance_to_the_mean_label():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.05).astype(float)
    for constant in (0.5, 0.9):  # above every bin's rate, so no bin's error cancels
        p = np.full(len(y), constant)
        assert ece(p, y) == pytest.approx(abs(constant - y.mean()), abs=1e-12)
    y_high = (rng.random(3000) < 0.95).astype(float)
    p = np.full(len(y_high), 0.1)  # below every bin's rate
    assert ece(p, y_high) == pytest.approx(abs(0.1 - y_high.mean()), abs=1e-12)


def test_ece_of_no_predictions_is_zero():
    assert ece(np.array([]), np.array([])) == 0.0


def test_metrics_of_an_absent_format_are_nan_not_an_error():
    p, y, fmt = np.array([0.1, 0.8, 0.3]), np.array([0.0, 1.0, 0.0]), np.array([0, 0, 2])
    metrics = per_format(p, y, fmt)
    assert metrics["audio"]["auc_pr"] == pytest.approx(1.0)
    assert np.isnan(metrics["video"]["auc_pr"]) and np.isnan(metrics["display"]["logloss"])


# --- paired comparison ------------------------------------------------------------------


def _results(auc_by_seed: list[tuple[float, float, float]]) -> list[dict]:
    return [
        {
            "formats": {
                f: {"expected_auc_pr": a, "expected_ece": 0.01}
                for f, a in zip(FORMATS, aucs, strict=True)
            }
        }
        for aucs in auc_by_seed
    ]


def test_paired_differences_are_taken_seed_by_seed():
    per_seed = {
        "camoe": _results([(0.10, 0.20, 0.30), (0.20, 0.30, 0.40), (0.30, 0.40, 0.50)]),
        # Far below CAMoE's spread over seeds, but higher on audio in every seed.
        "other": _results([(0.11, 0.20, 0.30), (0.21, 0.30, 0.40), (0.31, 0.40, 0.50)]),
    }
    paired = quality.paired_differences(per_seed, "camoe")
    audio = paired["other"]["audio"]["expected_auc_pr"]
    assert audio["mean"] == pytest.approx(0.01)
    assert audio["se"] == pytest.approx(0.0, abs=1e-12)
    assert quality.dominates(paired["other"])


def test_a_model_better_on_one_format_and_worse_on_another_does_not_dominate():
    camoe = _results([(0.10, 0.20, 0.30), (0.12, 0.22, 0.31), (0.11, 0.19, 0.29)])
    better_audio_worse_video = _results(
        [(0.15, 0.10, 0.30), (0.17, 0.12, 0.31), (0.16, 0.09, 0.29)]
    )
    noisy = _results([(0.15, 0.20, 0.30), (0.07, 0.22, 0.31), (0.12, 0.19, 0.29)])
    paired = quality.paired_differences(
        {"camoe": camoe, "trade": better_audio_worse_video, "noisy": noisy}, "camoe"
    )
    assert not quality.dominates(paired["trade"])
    assert not quality.dominates(paired["noisy"])  # higher on average, within its noise


def test_one_seed_judges_nothing():
    paired = quality.paired_differences(
        {"camoe": _results([(0.1, 0.2, 0.3)]), "other": _results([(0.5, 0.5, 0.5)])}, "camoe"
    )
    assert paired["other"]["audio"]["expected_auc_pr"]["se"] is None
    assert not quality.dominates(paired["other"])
