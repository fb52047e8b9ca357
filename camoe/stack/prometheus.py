"""Prometheus (Debian's ``prometheus`` package) as a local process on loopback, scraping
the components' metrics endpoints; and its HTTP query API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from camoe.stack.exceptions import PrerequisiteError
from camoe.stack.process import claim_port, start_process


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise PrerequisiteError(
            f"{name} is missing: run `make setup` or `apt-get install prometheus`"
        )
    return found


def scrape_config(targets: dict[str, int], interval_s: float = 1.0) -> dict[str, Any]:
    """A configuration scraping job ``name`` at 127.0.0.1:``port`` for each target."""
    return {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for name, port in targets.items()
        ],
    }


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def start_server(
    config: dict[str, Any], data_dir: Path, log_path: Path, timeout_s: float = 60.0
) -> tuple[int, str]:
    """Starts Prometheus with ``config`` on a free loopback port; returns (pid, url)."""
    binary = _binary("prometheus")
    port = claim_port(None, "prometheus")
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    pid = start_process(
        "prometheus", command, log_path, healthy=lambda: healthy(url), timeout_s=timeout_s
    )
    return pid, url


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query (each: ``metric`` labels and ``value``)."""
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(address, timeout=10) as answer:
        body = json.load(answer)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {promql!r}: {body.get('error')}")
    return list(body["data"]["result"])


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition (returncode 0: no problem found)."""
    return subprocess.run(
        [_binary("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
