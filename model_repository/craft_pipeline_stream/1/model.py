"""craft_pipeline_stream: decoupled twin of craft_pipeline: progress messages, then the image."""

import triton_python_backend_utils as pb_utils

from craft_serving.triton_model import PipelineModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = PipelineModel(pb_utils, args)

    async def execute(self, requests):
        return await self.model.execute(requests)

    def finalize(self):
        self.model.close()
