"""Inference through the real tritonserver, and safe publishing into its repository."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from camoe.clients.triton import InferenceServerException, TritonClient
from camoe.sim.traffic import World
from trainer.export import Publisher
from trainer.model import ServingModel, build_camoe
from trainer.train import fit

MODEL = "camoe_parity"


@pytest.fixture(scope="module")
def parity_model(services):
    """A second model in the served repository, so other tests keep their version numbers."""
    settings, endpoints = services
    source = settings.triton.model_repo / "camoe"
    target = settings.triton.model_repo / MODEL
    target.mkdir()
    config = (source / "config.pbtxt").read_text()
    (target / "config.pbtxt").write_text(re.sub(r'name: "camoe"', f'name: "{MODEL}"', config))
    client = TritonClient(endpoints.triton, MODEL)
    yield settings, client
    client.close()


def test_published_version_is_served_and_matches_torch(parity_model):
    settings, client = parity_model
    history = World(settings.simulator).history(800)
    model = build_camoe(settings)
    fit(model, history, epochs=1)
    batch = (history["categorical"][:64], history["numeric"][:64], history["format"][:64])
    publisher = Publisher(settings.triton.model_repo, MODEL, client)

    assert publisher.publish(model, batch) == 1
    pctr, version = client.infer(*batch)
    with torch.no_grad():
        expected = (
            ServingModel(model)(
                torch.from_numpy(batch[0]),
                torch.from_numpy(batch[1]),
                torch.from_numpy(batch[2].reshape(-1, 1)),
            )
            .numpy()
            .reshape(-1)
        )
    assert version == "1"
    np.testing.assert_allclose(pctr, expected, atol=1e-5)

    fit(model, history, epochs=1)
    assert publisher.publish(model, batch) == 2
    assert client.ready_versions() == [1, 2]  # the previous version stays loaded
    _, version = client.infer(*batch)
    assert version == "2"


def test_bad_request_gets_its_own_error_and_the_server_keeps_serving(parity_model):
    settings, client = parity_model
    history = World(settings.simulator).history(16)
    categorical, numeric, fmt = history["categorical"], history["numeric"].copy(), history["format"]
    numeric[0, 0] = np.nan
    with pytest.raises(InferenceServerException, match="NaN"):
        client.infer(categorical, numeric, fmt)
    pctr, _ = client.infer(categorical, history["numeric"], fmt)
    assert np.isfinite(pctr).all() and pctr.shape == (16,)
    for index in (3, -1):  # no such tower (-1 would wrap to display in the graph)
        wrong = fmt.copy()
        wrong[5] = index
        message = rf"format index {index} is out of range: the model has 0 audio, 1 video, 2"
        with pytest.raises(InferenceServerException, match=message):
            client.infer(categorical, history["numeric"], wrong)
    # Out-of-vocabulary categorical indices are the documented "unknown" (index 0).
    unknown = categorical.copy()
    unknown[:, 0] = 10_000
    pctr, _ = client.infer(unknown, history["numeric"], fmt)
    assert np.isfinite(pctr).all()
