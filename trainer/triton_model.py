"""Triton Python-backend runner for the exported CAMoE ONNX file.

The exporter (trainer/export.py) copies this file into every version folder as
``model.py``. It runs in
Triton's own environment (numpy < 2, onnxruntime), not the project's.
"""

import json
import os
import sys

# The stub starts an isolated interpreter that ignores PYTHONPATH; the stack names the
# Triton runtime's site-packages here instead.
sys.path[:0] = [p for p in os.environ.get("CAMOE_TRITON_PYTHONPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        model_file = config["parameters"]["model_file"]["string_value"]
        # The towers, in index order: a format index outside them has no tower (the graph
        # would fail on one above and wrap one below zero to another format's).
        self.formats = config["parameters"]["formats"]["string_value"].split(",")
        path = os.path.join(args["model_repository"], args["model_version"], model_file)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # Triton schedules instances; keep each on one core
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        # Dynamic batching hands over several requests: run them as one ONNX batch, then
        # split; a request whose inputs are unusable gets its own error, the rest go on.
        arrays, errors = [], []
        for request in requests:
            tensors = [
                pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
            ]
            errors.append(self._problem(dict(zip(self.inputs, tensors, strict=True))))
            arrays.append(tensors)
        good = [a for a, e in zip(arrays, errors, strict=True) if e is None]
        outputs = []
        if good:
            feed = {n: np.concatenate([a[i] for a in good]) for i, n in enumerate(self.inputs)}
            result = self.session.run([self.output], feed)[0].astype(self.output_dtype)
            sizes = np.cumsum([len(a[0]) for a in good])[:-1]
            outputs = np.split(result, sizes)
        responses, k = [], 0
        for error in errors:
            if error is None:
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor(self.output, outputs[k])])
                )
                k += 1
            else:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
        return responses

    def _problem(self, tensors):
        """What makes a request's inputs unusable, in one line; None when they are fine."""
        if not np.isfinite(tensors["numeric"]).all():
            return "numeric input has NaN or inf"
        fmt = tensors["format"]
        outside = fmt[(fmt < 0) | (fmt >= len(self.formats))]
        if len(outside):
            known = ", ".join(f"{i} {name}" for i, name in enumerate(self.formats))
            return f"format index {int(outside[0])} is out of range: the model has {known}"
        return None
