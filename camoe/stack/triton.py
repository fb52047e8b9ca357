"""Triton: the CPU ``tritonserver`` from the nvidia-pytriton wheel as a local process.

The server runs from its own environment (``.triton-venv``: numpy < 2, onnxruntime),
because its Python backend cannot share Feast's numpy >= 2.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from camoe.clients.triton import TritonClient
from camoe.settings import ROOT
from camoe.stack.exceptions import PrerequisiteError
from camoe.stack.process import claim_port, free_port, start_process

RUNTIME = ROOT / ".triton-venv"


def runtime_paths(runtime: Path = RUNTIME) -> tuple[Path, Path, Path]:
    """(site-packages, tritonserver binary, backends folder) of the Triton runtime."""
    found = sorted(
        runtime.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver")
    )
    if not found:
        raise PrerequisiteError(
            f"the Triton runtime is missing at {runtime}: run `make setup` to install it"
        )
    binary = found[-1]
    server = binary.parent.parent
    stub = server / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        raise PrerequisiteError(
            f"Triton's Python backend stub is missing at {stub}: run `make setup`"
        )
    return server.parent.parent, binary, server / "backends"


def start_server(
    model_repo: Path,
    log_path: Path,
    timeout_s: float,
    load: list[str],
    grpc_port: int | None = None,
) -> tuple[int, str, str]:
    """Starts tritonserver in explicit model-control mode; returns (pid, grpc, http)."""
    site_packages, binary, backends = runtime_paths()
    grpc = claim_port(grpc_port, "triton")
    http, metrics = free_port(), free_port()
    command = [
        str(binary),
        f"--model-repository={model_repo}",
        "--model-control-mode=explicit",
        f"--backend-directory={backends}",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--exit-on-error=false",  # a model that fails to load must not take the server down
        # The config is complete; asking the Python backend to complete it starts one more
        # stub per load, 1.3 of a load's 1.6 s here.
        "--disable-auto-complete-config",
        "--log-verbose=0",
        *[f"--load-model={name}" for name in load],
    ]
    env = {
        # The wheel's bundled libraries, and libpython for the Python-backend stub.
        "LD_LIBRARY_PATH": os.pathsep.join(
            [str(site_packages / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        ),
        "CAMOE_TRITON_PYTHONPATH": str(site_packages),
    }
    grpc_url = f"127.0.0.1:{grpc}"
    pid = start_process(
        "triton",
        command,
        log_path,
        healthy=lambda: TritonClient(grpc_url).live(),
        timeout_s=timeout_s,
        env=env,
    )
    return pid, grpc_url, f"127.0.0.1:{http}"
