"""Export: files on disk -> baked UNet variants -> ONNX (-> TensorRT) -> a Triton model repository.

Recipes and loading, network wrappers, the export contract (specs), planning and baking, ONNX
export and parity, ONNX Runtime / TensorRT sessions, TensorRT build and refit, the manifest
schema and writer, and the one ``config.pbtxt`` writer. Imports ``craft_ops`` and the wire
schema (``craft_client.schema``), never the serving runtime.
"""
