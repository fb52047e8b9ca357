"""One feature schema (camoe/features.py): Feast's definitions, both Triton configs, the
simulator's columns and the counter pusher agree with it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from camoe.clients.feature_store import counter_pusher
from camoe.features import FEATURES, FORMATS, VIEW_ENTITIES, FeatureLayout, stored
from camoe.settings import ROOT, Settings
from camoe.sim.traffic import World

SETTINGS = Settings()
TRITON_CONFIGS = [
    ROOT / "model_repo" / "camoe" / "config.pbtxt",
    ROOT / "model_repo" / "camoe" / "configs" / "gpu.pbtxt",
]


@pytest.fixture(scope="module")
def definitions() -> ModuleType:
    path = ROOT / "feature_repo" / "definitions.py"
    spec = importlib.util.spec_from_file_location("feast_definitions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def feast_dtype(kind: str) -> str:
    return "Float32" if kind == "numeric" else "Int64"


def test_feast_views_hold_the_schemas_fields_with_their_types(definitions):
    from feast import FeatureView

    views = {v.name: v for v in vars(definitions).values() if isinstance(v, FeatureView)}
    assert set(views) == set(VIEW_ENTITIES)
    for name, view in views.items():
        # Feast keeps no field order: the layout reads the fields by name.
        expected = {f.name: feast_dtype(f.kind) for f in FEATURES if f.source == name}
        assert {f.name: str(f.dtype) for f in view.schema} == expected, name
        assert view.entities == [VIEW_ENTITIES[name]], name


def test_the_feature_service_serves_every_view(definitions):
    from feast import FeatureService

    services = {s.name: s for s in vars(definitions).values() if isinstance(s, FeatureService)}
    service = services[SETTINGS.feast.feature_service]
    assert {p.name for p in service.feature_view_projections} == set(VIEW_ENTITIES)


def test_counter_views_are_fed_by_push_sources(definitions):
    from feast import PushSource

    pushes = {s.name for s in vars(definitions).values() if isinstance(s, PushSource)}
    counters = {f.source for f in FEATURES if f.kind == "counter"}
    assert pushes == {f"{view}_push_source" for view in counters}


def triton_inputs(config: Path) -> tuple[int, dict[str, tuple[str, list[int]]]]:
    text = config.read_text()
    max_batch = re.search(r"max_batch_size:\s*(\d+)", text)
    assert max_batch is not None, config
    inputs = {
        name: (dtype, [int(d) for d in dims.split(",")])
        for name, dtype, dims in re.findall(
            r'name:\s*"(\w+)"\s+data_type:\s*(\w+)\s+dims:\s*\[([^\]]*)\]',
            text[text.index("input") : text.index("output")],
        )
    }
    return int(max_batch.group(1)), inputs


@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=lambda p: p.name)
def test_triton_configs_take_the_schemas_arrays(config):
    max_batch, inputs = triton_inputs(config)
    categorical = sum(f.kind == "categorical" for f in FEATURES)
    assert inputs == {
        "categorical": ("TYPE_INT64", [categorical]),
        "numeric": ("TYPE_FP32", [len(FEATURES) - categorical]),
        "format": ("TYPE_INT64", [1]),
    }
    assert max_batch == SETTINGS.triton.max_batch_size


def test_the_cpu_config_names_the_schemas_formats_in_index_order():
    text = TRITON_CONFIGS[0].read_text()
    found = re.search(r'key:\s*"formats"\s+value:\s*\{\s*string_value:\s*"([^"]*)"', text)
    assert found is not None
    assert tuple(found.group(1).split(",")) == FORMATS


def test_the_layout_is_the_schema_in_array_order():
    layout = FeatureLayout(SETTINGS.features.n_campaigns)
    assert [f.name for f in layout.categorical] == [
        f.name for f in FEATURES if f.kind == "categorical"
    ]
    assert layout.numeric == [f.input_name for f in FEATURES if f.kind != "categorical"]
    campaign = next(f for f in layout.categorical if f.name == "campaign_index")
    assert campaign.cardinality == SETTINGS.features.n_campaigns + 1


def test_the_simulators_offline_data_has_the_views_columns(tmp_path):
    import pandas as pd

    World(SETTINGS.simulator).write_offline_data(tmp_path)
    files = {
        "user_profile": "user_profiles",
        "ad_profile": "ad_profiles",
        "user_counters": "user_counters",
        "ad_counters": "ad_counters",
    }
    for view, file in files.items():
        columns = list(pd.read_parquet(tmp_path / f"{file}.parquet").columns)
        key = f"{VIEW_ENTITIES[view]}_id"
        assert sorted(columns) == sorted([key, "event_timestamp", *stored(view)]), view


def test_the_counter_pusher_writes_the_counter_views_fields():
    written: dict[str, list] = {}

    class View:
        def __init__(self, name: str) -> None:
            self.name = name

    class Provider:
        def online_write_batch(self, config, view, rows, progress) -> None:
            written[view.name] = [
                (list(key.join_keys), key.entity_values[0].string_val, sorted(values))
                for key, values, _, _ in rows
            ]

    class Store:
        config = None

        def _get_provider(self) -> Provider:
            return Provider()

        def get_feature_view(self, name: str) -> View:
            return View(name)

    counter_pusher(Store())({"u1": [3, 1]}, {"a1": [5, 0]})
    assert written == {
        "user_counters": [(["user_id"], "u1", sorted(stored("user_counters")))],
        "ad_counters": [(["ad_id"], "a1", sorted(stored("ad_counters")))],
    }
