"""The gRPC client of the Triton model the scorer and the publisher use: inference,
explicit loads and version queries."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def repository_config(model_dir: Path) -> dict[str, Any]:
    """A model's ``config.pbtxt`` as the JSON a load takes, read from the repository (so
    it works while no version of the model can load)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (Path(model_dir) / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    return dict(json_format.MessageToDict(config, preserving_proto_field_name=True))


class TritonClient:
    """gRPC client for one model: inference, explicit loads, version queries.

    Args:
        url: Triton's gRPC address, host:port.
        model: model name in the repository.
        timeout_s: per-call timeout.
        max_in_flight: most ``infer_async`` calls in flight at once.
    """

    def __init__(
        self, url: str, model: str = "camoe", timeout_s: float = 5.0, max_in_flight: int = 8
    ) -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)
        # ``infer_async`` runs blocking calls on these threads. gRPC's own futures start a
        # polling thread each time the channel goes from idle to busy: at a few calls per
        # batch that cost a third more CPU per call than a blocking call on a kept thread.
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="triton")

    def live(self) -> bool:
        return bool(self._client.is_server_live(client_timeout=1.0))

    def load(self, config: dict[str, Any] | None = None) -> None:
        """Loads (or reloads) the model: Triton re-reads its versions per version_policy.

        ``config`` (a whole model configuration, as ``repository_config`` returns it) replaces
        config.pbtxt for this load; the next load without one reads config.pbtxt again.
        """
        self._client.load_model(
            self.model, config=None if config is None else json.dumps(config), client_timeout=120.0
        )

    def unload(self) -> None:
        self._client.unload_model(self.model, client_timeout=120.0)

    def version_states(self) -> dict[int, str]:
        """Every version of the model Triton knows of, with its state (READY, UNAVAILABLE,
        LOADING, UNLOADING)."""
        index = self._client.get_model_repository_index(as_json=True).get("models", [])
        return {
            int(m["version"]): m.get("state", "")
            for m in index
            if m.get("name") == self.model and m.get("version")
        }

    def ready_versions(self) -> list[int]:
        return sorted(v for v, state in self.version_states().items() if state == "READY")

    def infer(
        self,
        categorical: np.ndarray,
        numeric: np.ndarray,
        fmt: np.ndarray,
        version: int | None = None,
    ) -> tuple[np.ndarray, str]:
        """pCTR (B,) float32 for a batch, and the version that produced it (raises Triton's
        InferenceServerException)."""
        inputs = [
            grpcclient.InferInput("categorical", list(categorical.shape), "INT64"),
            grpcclient.InferInput("numeric", list(numeric.shape), "FP32"),
            grpcclient.InferInput("format", [len(fmt), 1], "INT64"),
        ]
        inputs[0].set_data_from_numpy(np.ascontiguousarray(categorical))
        inputs[1].set_data_from_numpy(np.ascontiguousarray(numeric))
        inputs[2].set_data_from_numpy(fmt.reshape(-1, 1).astype(np.int64))
        result = self._client.infer(
            self.model,
            inputs,
            model_version=str(version or ""),
            outputs=[grpcclient.InferRequestedOutput("pctr")],
            client_timeout=self.timeout_s,
        )
        return result.as_numpy("pctr").reshape(-1), result.get_response().model_version

    def infer_async(
        self,
        categorical: np.ndarray,
        numeric: np.ndarray,
        fmt: np.ndarray,
        version: int | None = None,
    ) -> Future[tuple[np.ndarray, str]]:
        """``infer`` without waiting: up to ``max_in_flight`` batches are in flight at once,
        more wait for a free thread (the future raises what ``infer`` raises)."""
        return self._pool.submit(self.infer, categorical, numeric, fmt, version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


__all__ = ["InferenceServerException", "TritonClient"]
