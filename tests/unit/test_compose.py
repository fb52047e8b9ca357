"""docker-compose.yml agrees with camoe.settings (no Docker needed: the file is only parsed)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from camoe.settings import ROOT, ServiceUrlSource, Settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
APP_SERVICES = ("scoring", "labeler", "trainer")
EXPECTED_SERVICES = {"kafka", "kafka-init", "redis", "triton", "prometheus", "grafana"} | set(
    APP_SERVICES
)
# Variables the containers need that are not settings (they configure Python itself).
NON_SETTINGS_VARIABLES = {"PYTHONUNBUFFERED"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No CAMOE_*/service variables and no camoe.yaml: only the defaults plus what a test sets."""
    for name in list(os.environ):
        if name.startswith("CAMOE_") or name in ServiceUrlSource.VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def option(args: list[str], name: str) -> str | None:
    """Value of ``--name value`` or ``--name=value`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= EXPECTED_SERVICES
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["kafka-init"]["image"] == services["kafka"]["image"]
    assert services["redis"]["image"].startswith("redis:7")
    assert services["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")


def test_kafka_image_matches_settings_version(services: dict[str, dict[str, Any]]) -> None:
    assert services["kafka"]["image"].rsplit(":", 1)[1] == Settings().kafka.version


def test_every_published_port_binds_loopback(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert isinstance(port, str), f"{name}: write ports as quoted strings: {port!r}"
                assert port.startswith("127.0.0.1:"), f"{name}: {port}"
    assert published >= 7  # kafka, redis, triton x3, prometheus, grafana


def test_kafka_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = environment(kafka)
    assert env["KAFKA_NODE_ID"] == "1"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    init_deps = services["kafka-init"]["depends_on"]
    assert init_deps["kafka"]["condition"] == "service_healthy"


def test_kafka_init_creates_exactly_the_settings_topics(
    services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    text = command_text(services["kafka-init"])
    created: dict[str, int] = {}
    compacted: set[str] = set()
    creates = 0
    for segment in text.split("kafka-topics.sh")[1:]:
        args = shlex.split(segment.splitlines()[0])
        if "--create" not in args:
            continue
        creates += 1
        assert "--if-not-exists" in args, segment
        assert option(args, "--bootstrap-server") == "kafka:9092", segment
        topic, partitions = option(args, "--topic"), option(args, "--partitions")
        assert topic is not None and partitions is not None, segment
        created[topic] = int(partitions)
        if option(args, "--config") == "cleanup.policy=compact":
            compacted.add(topic)
    topics = Settings().kafka.topics.all()
    assert creates == len(created), "a topic is created twice"
    assert created == {spec.name: spec.partitions for spec in topics}
    assert compacted == {spec.name for spec in topics if spec.compacted}


def test_triton_serves_the_model_repo_explicitly(
    services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    triton = services["triton"]
    settings = Settings()
    command = triton["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    assert args[0] == "tritonserver"
    assert option(args, "--model-control-mode") == "explicit"
    assert option(args, "--load-model") == settings.triton.model_name
    container_repo = option(args, "--model-repository")
    mounts = dict(volume.rsplit(":", 1) for volume in triton["volumes"])
    assert mounts.get("./model_repo") == container_repo
    # ./model_repo, relative to the compose file (the repository root), is the settings' repo.
    assert (COMPOSE_FILE.parent / "model_repo").resolve() == settings.triton.model_repo.resolve()
    gpus = triton["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])


def test_app_services_run_the_cli_from_the_mounted_repo(
    services: dict[str, dict[str, Any]],
) -> None:
    expected = {"scoring": "camoe score", "labeler": "camoe label", "trainer": "camoe train"}
    for name, cli in expected.items():
        service = services[name]
        assert service["working_dir"] == "/app"
        assert "./:/app" in service["volumes"] or ".:/app" in service["volumes"]
        assert command_text(service).endswith(cli + '"') or command_text(service).endswith(cli)
        assert "pip install -e ." in command_text(service)
        deps = service["depends_on"]
        assert deps["kafka-init"]["condition"] == "service_completed_successfully"
        assert all("condition" in dep for dep in deps.values())
    assert services["scoring"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["triton"]["condition"] == "service_healthy"


def settings_path(name: str) -> tuple[str, ...] | None:
    """The settings attribute path a variable sets, or None when Settings does not read it."""
    if name in ServiceUrlSource.VARIABLES:
        return ServiceUrlSource.VARIABLES[name]
    if not name.startswith("CAMOE_"):
        return None
    parts = tuple(part.lower() for part in name.removeprefix("CAMOE_").split("__"))
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1:
            if not is_model:
                return None
            model = annotation
        elif is_model:
            return None  # a whole section cannot be set from one string
    return parts


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment_is_read_by_settings(
    name: str, services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    env = environment(services[name])
    for variable in ("KAFKA_BOOTSTRAP_SERVERS", "TRITON_URL", "CAMOE_FEAST__ONLINE_STORE"):
        assert variable in env, f"{name} lacks {variable}"
    paths = {}
    for variable, value in env.items():
        if variable in NON_SETTINGS_VARIABLES:
            continue
        path = settings_path(variable)
        assert path is not None, f"{name}: Settings does not read {variable}"
        paths[variable] = path
        clean_env.setenv(variable, value)
    settings = Settings()
    for variable, path in paths.items():
        value: Any = settings
        for part in path:
            value = getattr(value, part)
        assert str(value) == env[variable], f"{name}: {variable} -> {'.'.join(path)}"
    assert settings.feast.online_store == "redis"
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.triton.url == "triton:8001"


def test_app_endpoints_match_the_services(services: dict[str, dict[str, Any]]) -> None:
    kafka_advertised = environment(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    for name in APP_SERVICES:
        env = environment(services[name])
        assert f"PLAINTEXT://{env['KAFKA_BOOTSTRAP_SERVERS']}" == kafka_advertised
        assert env["TRITON_URL"] == "triton:8001"  # gRPC
        if "REDIS_URL" in env:
            assert env["REDIS_URL"] == "redis://redis:6379"
    assert environment(services["trainer"])["CAMOE_TRITON__HTTP_URL"] == "triton:8000"


def test_settings_path_rejects_unknown_variables() -> None:
    assert settings_path("CAMOE_FEAST__ONLINE_STORE") == ("feast", "online_store")
    assert settings_path("CAMOE_FEAST__ONLINE_STOR") is None
    assert settings_path("CAMOE_FEAST") is None
    assert settings_path("KAFKA_BROKERS") is None


def test_prometheus_scrapes_each_component_at_the_port_it_serves_on(
    services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    prometheus = services["prometheus"]
    assert "./monitoring:/etc/prometheus:ro" in prometheus["volumes"]
    config_file = option(prometheus["command"], "--config.file")
    assert config_file is not None and config_file.startswith("/etc/prometheus/")
    config = yaml.safe_load((ROOT / "monitoring" / config_file.split("/", 3)[3]).read_text())
    host = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"] == host["rule_files"]
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert set(targets) == {job["job_name"] for job in host["scrape_configs"]}
    for name in APP_SERVICES:
        env = environment(services[name])
        for variable, value in env.items():
            clean_env.setenv(variable, value)
        section = getattr(Settings(), name)
        for variable in env:
            clean_env.delenv(variable)
        assert targets[name] == [f"{name}:{section.metrics_port}"]
        assert section.metrics_address == "0.0.0.0"  # reachable on the compose network


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus(
    services: dict[str, dict[str, Any]],
) -> None:
    volumes = services["grafana"]["volumes"]
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes
    grafana = ROOT / "monitoring" / "grafana"
    (source,) = yaml.safe_load(
        (grafana / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (grafana / "provisioning" / "dashboards" / "camoe.yml").read_text()
    )["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert list((grafana / "dashboards").glob("*.json")), "no dashboard"
