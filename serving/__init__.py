"""Serving: the Triton-free pipeline runtime, engine batching and denoisers, the manifest reader,
the tritonserver launcher and the Triton glue the ``model_repository/*/model.py`` files call."""
