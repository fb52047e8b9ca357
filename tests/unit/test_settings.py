"""camoe/settings.py: defaults, environment, service variables and the YAML file."""

from __future__ import annotations

import os

import pytest
import yaml
from pydantic import ValidationError

from camoe.settings import ServiceUrlSource, Settings, StreamSettings, describe

SERVICE_VARIABLES = tuple(ServiceUrlSource.VARIABLES)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No CAMOE_* or service variable from the caller, and no camoe.yaml in the cwd."""
    for name in list(os.environ):
        if name.startswith("CAMOE_") or name in SERVICE_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_service_variables_are_the_three_known_ones():
    assert set(SERVICE_VARIABLES) == {"KAFKA_BOOTSTRAP_SERVERS", "TRITON_URL", "REDIS_URL"}


def test_defaults():
    s = Settings()
    assert s.scoring.batch_size == 512
    assert s.scoring.guarantee == "at-least-once"
    assert s.kafka.bootstrap_servers is None
    assert s.triton.url is None
    assert s.redis.url is None
    assert s.kafka.schema_registry_url is None
    assert s.feast.online_store == "sqlite"
    assert s.feast.feature_service == "camoe_v1"
    assert s.labeler.attribution_window_s == 10.0
    assert s.kafka.topics.ad_requests.name == "ad-requests"
    assert s.kafka.topics.ad_requests.partitions == 4
    assert s.kafka.topics.labelled_events.partitions == 1
    assert len(s.kafka.topics.all()) == 9
    assert list(s.simulator.format_shares) == ["audio", "video", "display"]


def test_nested_env_override(monkeypatch):
    monkeypatch.setenv("CAMOE_SCORING__BATCH_SIZE", "256")
    s = Settings()
    assert s.scoring.batch_size == 256
    assert s.scoring.group_id == "camoe-scoring"  # the rest of the section keeps its defaults


def test_env_value_is_validated(monkeypatch):
    monkeypatch.setenv("CAMOE_SCORING__BATCH_SIZE", "lots")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings()


@pytest.mark.parametrize(
    ("variable", "section", "value"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka", "broker-1:9092,broker-2:9092"),
        ("TRITON_URL", "triton", "triton.internal:8001"),
        ("REDIS_URL", "redis", "redis://cache:6379/0"),
    ],
)
def test_service_variables_land_on_their_section(monkeypatch, variable, section, value):
    monkeypatch.setenv(variable, value)
    s = Settings()
    attribute = "bootstrap_servers" if section == "kafka" else "url"
    assert getattr(getattr(s, section), attribute) == value
    others = {"kafka": s.kafka.bootstrap_servers, "triton": s.triton.url, "redis": s.redis.url}
    del others[section]
    assert set(others.values()) == {None}


def test_empty_service_variable_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, {"redis": {"url": "redis://y"}})))
    monkeypatch.setenv("REDIS_URL", "")
    assert Settings().redis.url == "redis://y"


def test_camoe_variable_beats_service_variable(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "plain:9092")
    monkeypatch.setenv("CAMOE_KAFKA__BOOTSTRAP_SERVERS", "camoe:9092")
    assert Settings().kafka.bootstrap_servers == "camoe:9092"


def test_keyword_arguments_beat_env(monkeypatch):
    monkeypatch.setenv("CAMOE_SCORING__BATCH_SIZE", "256")
    assert Settings(scoring={"batch_size": 8}).scoring.batch_size == 8


YAML_CONFIG = {
    "kafka": {"bootstrap_servers": "yaml-broker:9092", "version": "3.9.0"},
    "scoring": {"batch_size": 32, "group_id": "from-yaml"},
    "labeler": {"attribution_window_s": 3.5},
}


def test_yaml_named_by_camoe_config_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, YAML_CONFIG)))
    s = Settings()
    assert s.kafka.bootstrap_servers == "yaml-broker:9092"
    assert s.kafka.version == "3.9.0"
    assert s.scoring.batch_size == 32
    assert s.scoring.group_id == "from-yaml"
    assert s.labeler.attribution_window_s == 3.5
    assert s.trainer.pretrain_batch_size == 256  # untouched sections keep defaults


def test_env_beats_yaml_and_merges_with_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, YAML_CONFIG)))
    monkeypatch.setenv("CAMOE_SCORING__BATCH_SIZE", "256")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env-broker:9092")
    s = Settings()
    assert s.scoring.batch_size == 256
    assert s.scoring.group_id == "from-yaml"  # the YAML's other keys in the section survive
    assert s.kafka.bootstrap_servers == "env-broker:9092"
    assert s.kafka.version == "3.9.0"


def test_camoe_yaml_in_working_directory_is_the_default(tmp_path):
    write_config(tmp_path, {"scoring": {"batch_size": 16}}, name="camoe.yaml")
    assert Settings().scoring.batch_size == 16


def test_no_config_file_anywhere_means_defaults():
    assert Settings().scoring.batch_size == 512


def test_empty_yaml_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, "")))
    assert Settings().scoring.batch_size == 512


def test_camoe_config_naming_a_missing_file_raises(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "camoe.yaml"
    monkeypatch.setenv("CAMOE_CONFIG", str(missing))
    with pytest.raises(FileNotFoundError, match=r"CAMOE_CONFIG names .*nowhere"):
        Settings()


def test_yaml_that_is_not_a_mapping_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, "- just\n- a list\n")))
    with pytest.raises(ValueError, match="must be a mapping"):
        Settings()


def test_unknown_top_level_yaml_key_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, {"scorin": {"batch_size": 1}})))
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert caught.value.errors()[0]["type"] == "extra_forbidden"
    assert caught.value.errors()[0]["loc"] == ("scorin",)


def test_unknown_keyword_is_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(bogus=1)


def test_unknown_key_inside_a_section_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_CONFIG", str(write_config(tmp_path, {"scoring": {"batchsize": 8}})))
    with pytest.raises(ValidationError):
        Settings()


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError):
        s.scoring = s.scoring


def test_a_wave_that_overflows_tritons_max_batch_is_refused_in_one_line():
    with pytest.raises(ValidationError) as caught:
        Settings(scoring={"triton_chunk_requests": 128, "max_candidates": 64})
    line = describe(caught.value)
    assert "\n" not in line
    assert "triton_chunk_requests x scoring.max_candidates = 8192" in line
    assert "triton.max_batch_size 4096" in line
    # Raising Triton's limit with it is the other way out.
    Settings(
        scoring={"triton_chunk_requests": 128, "max_candidates": 64},
        triton={"max_batch_size": 8192},
    )


def test_the_simulated_campaigns_must_fit_the_models_vocabulary():
    with pytest.raises(ValidationError, match=r"features\.n_campaigns 40"):
        Settings(simulator={"n_campaigns": 41})
    assert Settings(simulator={"n_campaigns": 41}, features={"n_campaigns": 41})


def test_describe_names_each_wrong_key_on_one_line():
    with pytest.raises(ValidationError) as caught:
        Settings(scoring={"batch_size": 0}, trainer={"online_batch_size": "lots"})
    line = describe(caught.value)
    assert line.startswith("invalid settings: ") and "\n" not in line
    assert "scoring.batch_size" in line and "trainer.online_batch_size" in line


def test_components_stream_options_come_from_one_declaration():
    s = Settings()
    for section in (s.scoring, s.labeler, s.trainer):
        assert isinstance(section, StreamSettings)
    assert s.labeler.guarantee == "exactly-once"
    with pytest.raises(ValidationError, match="exactly-once"):
        Settings(labeler={"guarantee": "at-least-once"})


# --- Redis credentials ----------------------------------------------------------------


def test_redis_password_comes_from_the_environment_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("CAMOE_REDIS__USERNAME", "camoe")
    monkeypatch.setenv("CAMOE_REDIS__PASSWORD", "hunter2")
    redis = Settings().redis
    assert redis.secret() == "hunter2"
    assert "hunter2" not in repr(redis) and "hunter2" not in Settings().model_dump_json()


def test_redis_password_file_is_read_and_a_missing_one_is_one_line(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("from-a-file\n")
    assert Settings(redis={"password_file": secret}).redis.secret() == "from-a-file"
    missing = Settings(redis={"password_file": tmp_path / "nope"}).redis
    with pytest.raises(ValueError, match=r"redis\.password_file: cannot read"):
        missing.secret()


@pytest.mark.parametrize(
    ("redis", "says"),
    [
        ({"username": "camoe"}, "no password is set"),
        ({"password": "a", "password_file": "/x"}, "not both"),
    ],
)
def test_redis_credentials_that_cannot_work_are_refused(redis, says):
    with pytest.raises(ValidationError, match=says):
        Settings(redis=redis)


def test_feast_connection_string_carries_the_acl_user():
    from camoe.clients.feature_store import redis_connection_string
    from camoe.settings import RedisSettings

    url = "redis://127.0.0.1:6380/0"
    assert redis_connection_string(url) == "127.0.0.1:6380"
    with_user = RedisSettings(username="camoe", password="pw")
    assert redis_connection_string(url, with_user) == "127.0.0.1:6380,username=camoe,password=pw"
    with pytest.raises(ValueError, match="cannot hold"):
        redis_connection_string(url, RedisSettings(password="a,b"))


def test_child_processes_get_the_password_from_the_environment_not_the_file(tmp_path):
    from camoe.supervisor import secret_environment, write_settings

    settings = Settings(redis={"username": "camoe", "password": "hunter2"})
    path = write_settings(settings, tmp_path / "settings.yaml")
    assert "hunter2" not in path.read_text() and "password:" not in path.read_text()
    assert secret_environment(settings) == {"CAMOE_REDIS__PASSWORD": "hunter2"}
    assert secret_environment(Settings()) == {}


# --- Kafka security ---------------------------------------------------------------------


def test_kafka_security_is_plaintext_by_default_and_sasl_needs_a_user():
    assert Settings().kafka.security.protocol == "PLAINTEXT"
    with pytest.raises(ValidationError, match=r"set kafka\.security\.username"):
        Settings(kafka={"security": {"protocol": "SASL_SSL"}})
    with pytest.raises(ValidationError, match="no password is set"):
        Settings(kafka={"security": {"protocol": "SASL_SSL", "username": "camoe"}})
    with pytest.raises(ValidationError, match="has no SASL"):
        Settings(kafka={"security": {"username": "camoe", "password": "pw"}})


def test_kafka_password_comes_from_the_environment_or_a_file_and_never_shows(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMOE_KAFKA__SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CAMOE_KAFKA__SECURITY__USERNAME", "camoe")
    monkeypatch.setenv("CAMOE_KAFKA__SECURITY__PASSWORD", "hunter2")
    settings = Settings()
    assert settings.kafka.security.secret() == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.model_dump_json()
    monkeypatch.delenv("CAMOE_KAFKA__SECURITY__PASSWORD")
    secret = tmp_path / "kafka-password"
    secret.write_text("from-a-file\n")
    from_file = Settings(kafka={"security": {"password_file": secret}}).kafka.security
    assert from_file.secret() == "from-a-file"
    missing = Settings(kafka={"security": {"password_file": tmp_path / "nope"}}).kafka.security
    with pytest.raises(ValueError, match=r"kafka\.security\.password_file: cannot read"):
        missing.secret()


def test_every_client_gets_the_security_properties_from_the_connection(tmp_path):
    from camoe.clients.kafka import KafkaConnection, consumer_config, producer_config

    security = Settings(
        kafka={
            "security": {
                "protocol": "SASL_SSL",
                "username": "camoe",
                "password": "hunter2",
                "ca_file": tmp_path / "ca.pem",
            }
        }
    ).kafka.security
    connection = KafkaConnection("127.0.0.1:9093", security)
    expected = {
        "bootstrap.servers": "127.0.0.1:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "camoe",
        "sasl.password": "hunter2",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.endpoint.identification.algorithm": "https",
    }
    assert connection.properties() == expected
    for config in (consumer_config(connection, "g"), producer_config(connection)):
        assert {k: config[k] for k in expected} == expected
    assert "hunter2" not in repr(connection) and str(connection) == "127.0.0.1:9093"
    # A bare address is a plaintext cluster.
    assert consumer_config("127.0.0.1:9092", "g")["security.protocol"] == "PLAINTEXT"
    assert "sasl.password" not in producer_config("127.0.0.1:9092")


def test_child_processes_get_the_kafka_password_from_the_environment_not_the_file(tmp_path):
    from camoe.supervisor import secret_environment, write_settings

    settings = Settings(
        kafka={"security": {"protocol": "SASL_SSL", "username": "camoe", "password": "hunter2"}}
    )
    path = write_settings(settings, tmp_path / "settings.yaml")
    assert "hunter2" not in path.read_text() and "password:" not in path.read_text()
    assert secret_environment(settings) == {"CAMOE_KAFKA__SECURITY__PASSWORD": "hunter2"}
