"""craft_catalog: the served LoRAs, pairs, defaults and limits, read from manifest.json."""

import triton_python_backend_utils as pb_utils

from craft_serving.catalog import CatalogModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = CatalogModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)
