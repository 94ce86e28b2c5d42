"""The Triton Python-backend model behind every CPU config: runs a version's model.onnx.

With the ``onnx_chain`` parameter (``"ranker_features,ranker"``) it runs those models' graphs
of its own version in sequence instead: the ranker ensemble fused into one Python-backend
execution, which is ``ranker_ensemble``'s CPU config (``export/triton_config.py``
:data:`FUSED_CONFIG_NAMES`; BENCHMARKS.md "Tuning" measures what it saves).

Each model folder's ``model.py`` (checked in, copied into every version folder by
``recsys export``) only imports :class:`TritonPythonModel` from here, so the four graph-backed
models share one implementation instead of four copies. The module is imported by Triton's
Python-backend stub, which runs inside the project's virtualenv (``recsys triton`` starts the
server from it); ``triton_python_backend_utils`` exists only there, so it is imported lazily.
Tensor names and types come from the model's config.
"""

import json
import os

import numpy as np
import onnxruntime as ort


class TritonPythonModel:
    """Concatenates the dynamic batcher's requests, runs the graph once, splits the outputs.

    A model without a batch axis (``max_batch_size: 0``) runs each request on its own.
    """

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        threads = int(params.get("intra_op_threads", {}).get("string_value", "1"))
        opts = ort.SessionOptions()
        # few threads per instance: Triton runs instances and requests in parallel already
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # "onnx_chain": run other models' graphs of the same version one after the other in
        # this one execution (the ensemble's steps without a Python-backend hop between them)
        chain = params.get("onnx_chain", {}).get("string_value", "")
        if chain:
            parent = os.path.dirname(os.path.normpath(args["model_repository"]))
            paths = [os.path.join(parent, name.strip(), args["model_version"], "model.onnx") for name in chain.split(",")]
        else:
            paths = [os.path.join(args["model_repository"], args["model_version"], "model.onnx")]
        self.sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in paths]
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        # no batch axis (the ranker's [U, L] + [N] layout): requests cannot be concatenated
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _run(self, feeds):
        for session, following in zip(self.sessions, self.sessions[1:]):  # outputs feed the next graph's inputs, in order
            feeds = {i.name: o for i, o in zip(following.get_inputs(), session.run(None, feeds))}
        return self.sessions[-1].run(self.outputs, feeds)

    def execute(self, requests):
        if not self.batched:
            return [self._execute_batch([r])[0] for r in requests]
        return self._execute_batch(requests)

    def _execute_batch(self, requests):
        pb_utils = self.pb_utils
        try:
            per_request = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in self.inputs] for r in requests]
            sizes = [arrays[0].shape[0] for arrays in per_request]
            feeds = {
                name: np.ascontiguousarray(np.concatenate([arrays[i] for arrays in per_request]), dtype=dtype)
                for i, (name, dtype) in enumerate(self.inputs)
            }
            results = self._run(feeds)
        except Exception as exc:  # one bad batch fails its requests, not the server
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        bounds = np.cumsum(sizes)[:-1]
        split = [np.split(out, bounds) for out in results]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(name, split[j][i]) for j, name in enumerate(self.outputs)])
            for i in range(len(requests))
        ]
