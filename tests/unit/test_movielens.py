"""camoe/bench/movielens.py and the quality bench on it, on a small slice of the real
files (fetched by `make setup`). It checks what is read and written, never which model
wins."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from camoe.bench import movielens, quality
from camoe.settings import Settings

SLICE = 3000


@pytest.fixture(scope="module")
def ratings():
    return movielens.load(limit=SLICE)


def test_the_slice_is_the_first_ratings_in_time_with_their_domain_and_label(ratings):
    raw = pd.read_parquet(movielens.DATA_DIR / "MovieLens100k_data.parquet.brotli")
    first = raw.sort_values(["timestamp", "user_id", "movie_id"]).head(SLICE)
    assert len(ratings["label"]) == SLICE
    np.testing.assert_array_equal(ratings["label"], (first["rating"].to_numpy() > 3))
    users = pd.read_parquet(movielens.DATA_DIR / "MovieLens100k_users.parquet.brotli")
    ages = first.merge(users, on="user_id", how="left")["age"].to_numpy()
    np.testing.assert_array_equal(ratings["format"], movielens.domain_of(ages))
    np.testing.assert_array_equal(ratings["categorical"][:, 2], ratings["format"] + 1)
    assert ratings["numeric"].shape == (SLICE, len(movielens.NUMERIC))
    assert np.isfinite(ratings["numeric"]).all()


def test_domains_split_ages_at_25_and_35():
    assert movielens.domain_of(np.array([7, 24, 25, 34, 35, 73])).tolist() == [0, 0, 1, 1, 2, 2]


def test_every_categorical_index_is_within_its_vocabulary(ratings):
    cards = movielens.cardinalities(ratings)
    assert len(cards) == len(movielens.CATEGORICAL)
    assert (ratings["categorical"] >= 1).all()
    assert (ratings["categorical"] < np.asarray(cards)).all()


def test_missing_files_name_the_command_that_fetches_them(tmp_path):
    with pytest.raises(movielens.DatasetMissing, match="make setup"):
        movielens.load(tmp_path)


def test_quality_bench_runs_every_model_on_the_domains(tmp_path):
    settings = Settings(
        bench={"requests": SLICE, "epochs": 1, "models": ["camoe", "dcn_global", "content_mmoe"]}
    )
    lines: list[str] = []
    summary = quality.run(
        settings, tmp_path, seeds=2, progress=lines.append, dataset="movielens-100k"
    )
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["dataset"] == "movielens-100k"
    assert data["tasks"] == list(movielens.DOMAINS)
    assert list(data["models"]) == ["camoe", "dcn_global"]  # content types are the simulator's
    assert data["oracle"] is None
    assert data["compared_metrics"] == ["auc_pr", "ece"]
    gap = summary["paired_with_camoe"]["dcn_global"]["under_25"]["auc_pr"]
    assert np.isfinite(gap["mean"]) and gap["se"] is not None
    for name in ("quality.md", "pareto.png", "calibration.png"):
        assert (tmp_path / name).is_file(), name
    rows = (tmp_path / "quality.md").read_text().strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["camoe", "dcn_global"]
