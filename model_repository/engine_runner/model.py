"""An exported network (ONNX Runtime session) served by the Python backend, batched."""

import triton_python_backend_utils as pb_utils

from craft_serving.triton_model import EngineModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = EngineModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)
