"""Triton model templates, installed as package data (``craft_model_repository``).

``craft export`` copies ``craft_pipeline`` and ``craft_pipeline_stream`` into a model
repository, and ``engine_runner/model.py`` into every engine model served by the Python
backend (machines without the native onnxruntime / tensorrt backends).
"""
