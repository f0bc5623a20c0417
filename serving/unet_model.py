"""Triton glue of the repository's one ``unet`` model (Python backend): requests -> :class:`.unet_weights.UNetWeights`.

Triton's dynamic batcher hands over the UNet calls queued at once, from any requests: different
LoRAs, gates and baked variants. Requests whose image size agrees are concatenated into one batch
(:func:`.batching.run_batched`) whose rows name their weights (``lora_content``, ``lora_style``,
``gate_c``, ``gate_s``; :data:`craft_export.unet_runner.SELECTORS`); the weights pick a session per row.
A request naming weights the repository does not hold (a LoRA the runtime network does not serve,
a variant a baked repository lacks) fails alone with INVALID_ARG; the rest of the batch runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


from .batching import run_batched
from .fed_unet import DEFAULT_FED_VARIANTS
from .merged_unet import DEFAULT_IDLE_MS, DEFAULT_MERGE_AFTER, DEFAULT_MERGED_VARIANTS
from .runtime_unet import RuntimeLoraRequestError
from .triton_model import from_wire
from .unet_weights import SELECTOR_NAMES, UNetWeights, UNetWeightsError, split_selectors

__all__ = ["UNetModel"]



def _int_param(params: dict, name: str, default: int) -> int:
    text = params.get(name, "")
    try:
        return int(text) if text != "" else default
    except ValueError:
        raise ValueError(f"config.pbtxt parameter {name}: must be an integer, got {text!r}") from None


def _device(args: dict[str, str], params: dict) -> int | None:
    """The CUDA device of a TensorRT runner's instance (Triton's ``model_instance_device_id``), else None."""
    if params.get("craft_runtime") != "tensorrt" or args.get("model_instance_kind") != "GPU":
        return None
    return int(args.get("model_instance_device_id") or 0)


class UNetModel:
    """See the module docstring."""

    def __init__(self, pb_utils, args: dict[str, str]):
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.inputs = tuple(i["name"] for i in config["input"])
        repo = Path(args["model_repository"]).resolve().parent
        self.weights = UNetWeights(repo, threads=int(params.get("threads", "0") or 0),
                                   merge_after=_int_param(params, "merge_after", DEFAULT_MERGE_AFTER),
                                   merged_variants=_int_param(params, "merged_variants", DEFAULT_MERGED_VARIANTS),
                                   fed_variants=_int_param(params, "fed_variants", DEFAULT_FED_VARIANTS),
                                   merge_idle_ms=_int_param(params, "merge_idle_ms", DEFAULT_IDLE_MS),
                                   report=lambda message: pb_utils.Logger.log_info(f"craft: {message}"),
                                   device=_device(args, params))
        self.ranks = self.weights.input_ranks

    def _arrays(self, request) -> dict[str, np.ndarray]:
        arrays = {}
        for name in self.inputs:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            value = tensor.as_numpy()
            arrays[name] = value.reshape(-1) if name in SELECTOR_NAMES else from_wire(value, self.ranks.get(name, 0))
        return arrays

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        variants, feed = split_selectors(batch)
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        return {"noise_pred": self.weights(inputs, variants).numpy()}

    def _check(self, arrays: dict[str, np.ndarray]) -> str | None:
        missing = [n for n in (*self.ranks, *SELECTOR_NAMES) if n not in arrays]
        if missing:
            return f"missing input {missing[0]!r}"
        rows = arrays["sample"].shape[0]
        for name in SELECTOR_NAMES:
            if arrays[name].shape[0] != rows:
                return f"{name}: {arrays[name].shape[0]} values for a batch of {rows}"
        return None

    def execute(self, requests: list[Any]):
        pb = self.pb
        batches, errors = {}, {}
        for i, request in enumerate(requests):
            arrays = self._arrays(request)
            problem = self._check(arrays)
            if problem:
                errors[i] = pb.TritonError(problem, pb.TritonError.INVALID_ARG)
            else:
                batches[i] = arrays
        results = {}
        try:
            ok = list(batches)
            results = dict(zip(ok, run_batched(self._run, [batches[i] for i in ok], self.max_batch)))
        except (RuntimeLoraRequestError, UNetWeightsError, ValueError):
            # one request's bad selectors fail it alone: run the others one at a time
            for i, arrays in batches.items():
                try:
                    results[i] = self._run(arrays)
                except (RuntimeLoraRequestError, UNetWeightsError, ValueError) as exc:
                    errors[i] = pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)
                except Exception as exc:  # noqa: BLE001 - this request's error response
                    errors[i] = pb.TritonError(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - report to every request of the batch
            return [pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")) for _ in requests]
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb.InferenceResponse(error=errors[i]))
            else:
                out = np.ascontiguousarray(results[i]["noise_pred"])
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("noise_pred", out)]))
        return responses
