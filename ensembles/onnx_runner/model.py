"""Runs one ONNX graph through onnxruntime inside the Python backend: the CPU target's stand-in
for Triton's onnxruntime backend (the pytriton wheel's Triton has only the Python backend).

The config names the graph (`onnx_file`) and its I/O, the same names the gpu target's
`backend: "onnxruntime"` config uses. Requests of one execute call that have equal input shapes
(beyond the batch dim) run as one onnxruntime batch, others separately.
"""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(HERE, params.get("onnx_file", "model.onnx")), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs]
            key = tuple((a.dtype.str, a.shape[1:]) for a in arrays)
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            try:
                feeds = {name: np.concatenate([arrays[j] for _, arrays in members]) if len(members) > 1
                         else members[0][1][j] for j, name in enumerate(self.inputs)}
                results = self.session.run([name for name, _ in self.outputs], feeds)
                start = 0
                for i, arrays in members:
                    n = arrays[0].shape[0]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(name, np.ascontiguousarray(r[start:start + n], dtype=dtype))
                        for (name, dtype), r in zip(self.outputs, results)])
                    start += n
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"onnxruntime failed: {e}"))
        return responses
