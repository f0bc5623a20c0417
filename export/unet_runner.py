"""The one Triton model that serves every UNet weight set of a repository (Python runner, issue 14).

With the Python runner (``--runner python``, what ``auto`` picks for the pytriton ``tritonserver``
used on CPU and in CI) every Triton model is a stub process of its own (about 280 MB resident
each on CPU, a CUDA context each on a GPU), so one model per baked variant made server memory
grow with the number of variants. Instead ``craft export`` writes ONE model, ``unet``
(``model_repository/unet_runner``, :class:`craft_serving.unet_model.UNetModel`), whose runner
holds the W_init session, the baked variants (sessions sharing W_init's unchanged weights,
loaded on first use) and, in runtime mode, the runtime-LoRA network, and picks per sample.

The variants' folders (``unet_base``, ``unet_c-dog``, ...) stay, content-keyed, but hold only
weights (``1/model.onnx`` and the list of initializers the variant changed, ``1/changed.json``);
they are no Triton models. Per sample the pipeline sends what selects the weights: the UNet's
own inputs plus ``lora_content`` / ``lora_style`` (BYTES, "" = none) and ``gate_c`` / ``gate_s``
(FP32, the step's gates). The native backends (``--runner native``) keep one model per variant.

With ``--runtime tensorrt`` the runner is a GPU instance and each folder holds its engine
(``1/model.plan``; W_init and the runtime network keep their ONNX beside it): one CUDA context for
every UNet weight set instead of one per variant model. A TensorRT engine holds all its weights, so
GPU memory still grows with the baked variants; the runtime network is what keeps it flat.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from .plan import FORMAT_VERSION, stable_hash
from .specs import NetworkSpec, TensorSpec

__all__ = ["UNET_MODEL", "UNET_RUNNER", "SELECTORS", "CHANGED_FILE", "served_by_runner", "runner_key", "runner_spec",
           "write_runner", "write_changed"]

UNET_MODEL = "unet"  # the Triton model's name (manifest: networks.unet)
UNET_RUNNER = "unet_runner"  # its job's network kind, and its template folder in model_repository/
CHANGED_FILE = "changed.json"  # in a variant's version folder: the initializers it replaces in W_init's graph
RUNNER_VERSION = 2  # raise when the runner's config changes (2: fed_variants, merge_idle_ms), so re-exports rewrite it
#: per-sample weight selectors the pipeline sends beside the UNet inputs
SELECTORS = (TensorSpec("lora_content", "BYTES", ("B",)), TensorSpec("lora_style", "BYTES", ("B",)),
             TensorSpec("gate_c", "FP32", ("B",)), TensorSpec("gate_s", "FP32", ("B",)))


def served_by_runner(build: Mapping[str, object]) -> bool:
    """Whether an export with these build settings serves its UNets from the one ``unet`` model: the
    Python runner, over ONNX Runtime sessions or TensorRT engines. The native backends keep a model
    per variant (they run inside Triton's own process: no stub, no CUDA context of their own)."""
    return build.get("runner") == "python"


def runner_key(build: Mapping[str, object]) -> str:
    """The runner model's content key: it holds no weights, so only the build settings matter."""
    return stable_hash({"v": FORMAT_VERSION, "network": UNET_RUNNER, "runner": RUNNER_VERSION, "build": dict(build)})


def runner_spec(unet: NetworkSpec) -> NetworkSpec:
    """The UNet's inputs and outputs plus the per-sample selectors."""
    return NetworkSpec(unet.kind, unet.arch, unet.inputs + SELECTORS, unet.outputs, max_batch=unet.max_batch,
                       latent_scale=unet.latent_scale, meta=unet.meta)


MERGE_AFTER = 2  # runtime mode: a variant's calls before the runner merges its LoRAs into W_init's graph
MERGED_VARIANTS = 4  # runtime mode: merged variants the runner holds at once (0: none)
MERGE_IDLE_MS = 250  # runtime mode: a merge starts once the runner had no UNet call for this long (0: at once)
FED_VARIANTS = 8  # runtime mode: LoRAs at a gate the runner's fed session keeps merged (0: no fed session)


def write_runner(target: Path, unet: NetworkSpec, max_batch: int, threads: int = 0,
                 runtime: str = "onnxruntime") -> dict:
    """``target/config.pbtxt`` and ``target/1/model.py`` of the runner model; its manifest record.

    ``runtime="tensorrt"``: a GPU instance running the folders' ``model.plan`` engines; merging LoRAs
    into W_init's graph (ONNX Runtime sessions) is off there."""
    from .repo_files import templates
    from .triton_config import config_pbtxt

    shutil.rmtree(target, ignore_errors=True)
    (target / "1").mkdir(parents=True)
    gpu = runtime == "tensorrt"
    text = config_pbtxt(UNET_MODEL, runner_spec(unet), platform="python", max_batch_size=max_batch,
                        instance_kind="KIND_GPU" if gpu else "KIND_CPU", dynamic_batching=True, max_queue_delay_us=0,
                        parameters={"craft_runtime": runtime, "craft_network": UNET_RUNNER, "threads": threads,
                                    "merge_after": MERGE_AFTER, "merged_variants": 0 if gpu else MERGED_VARIANTS,
                                    "merge_idle_ms": MERGE_IDLE_MS, "fed_variants": 0 if gpu else FED_VARIANTS})
    (target / "config.pbtxt").write_text(text)
    shutil.copy(templates() / UNET_RUNNER / "model.py", target / "1" / "model.py")
    return {"network": UNET_RUNNER, "export": "runner"}


def write_changed(version_dir: Path, names) -> None:
    """Record which initializers of W_init's graph a derived variant replaces (the runner shares the rest)."""
    (Path(version_dir) / CHANGED_FILE).write_text(json.dumps(sorted(names)) + "\n")
