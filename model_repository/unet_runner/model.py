"""Every UNet weight set of the repository in one model: baked variants and the runtime-LoRA network, picked per sample."""

import triton_python_backend_utils as pb_utils

from craft_serving.unet_model import UNetModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = UNetModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)
