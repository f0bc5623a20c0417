"""The serving pipeline behind ``craft_pipeline``: request tensors -> images, networks via BLS.

Nothing here imports Triton or knows its tensor layouts: the glue (:mod:`.triton_model`) hands
in ``infer_many``, a callable that runs several network calls (concurrently where it can) and
returns their outputs with the networks' own shapes, so the same code runs inside Triton (BLS)
or against any other runner. The request loop is :func:`craft_ops.conditioning.run_plan` over
``craft_ops.sampling.sample`` - the exact loop the PyTorch reference runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from craft_client.schema import DTYPES, REQUEST_INPUTS
from craft_ops.aggregate import BASE
from craft_ops.conditioning import build_conditioning, run_plan, to_uint8, tokenize, unet_inputs
from craft_ops.request import GenerateRequest, Limits, Plan, RequestError, plan_request
from craft_ops.sampling import UNetCall, step_variants

from .manifest import RepoView, read_manifest

__all__ = [
    "UNET_CALLS",
    "NetCall",
    "InferMany",
    "Cancelled",
    "request_from_arrays",
    "PipelineRuntime",
]


@dataclass(frozen=True)
class NetCall:
    """One network evaluation: Triton model name, named input tensors, wanted outputs.

    Inputs are torch tensors on the pipeline's device; ``infer_many`` returns torch
    tensors on that device too (CPU: via numpy; GPU: via DLPack, no host round trip).
    """

    model: str
    inputs: Mapping[str, torch.Tensor]
    outputs: tuple[str, ...]


InferMany = Callable[[Sequence[NetCall]], list[dict[str, torch.Tensor]]]


#: how the step's UNet calls reach a repository's one ``unet`` model: "step" (the default) sends the
#: conditional and unconditional ACFG rows as ONE request; "branch" sends one request per branch, one
#: after the other (ACFG as two calls: a benchmark / parity option, not a serving setting)
UNET_CALLS = ("step", "branch")


class Cancelled(RuntimeError):
    """The client cancelled the request; the loop stops at the next step."""


def _shown(arr: np.ndarray):
    """A request value as an error message shows it: the values when few, else the shape."""
    arr = np.asarray(arr)
    if arr.size <= 4:
        return [v[:40] if isinstance(v, (bytes, str)) else v for v in arr.reshape(-1).tolist()]
    return f"<{arr.dtype} array of shape {list(arr.shape)}>"


def _text(value, field: str, max_chars: int) -> str:
    """A BYTES element as text: refused before decoding when longer than ``max_chars`` UTF-8 characters
    could be (4 bytes each), and when not UTF-8."""
    if isinstance(value, bytes):
        if len(value) > 4 * max_chars:
            raise RequestError(field, value[:40] + b"...", f"is {len(value)} bytes, longer than {max_chars} characters")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(field, value[:40], "is not valid UTF-8") from exc
    return str(value)


def _scalar(arrays: Mapping[str, np.ndarray], name: str, limits: Limits):
    arr = arrays.get(name)
    if arr is None:
        return None
    dtype, dims, _ = REQUEST_INPUTS[name]
    flat = np.asarray(arr).reshape(-1)
    if flat.size != dims[0]:
        raise RequestError(name, _shown(arr), f"must hold {dims[0]} value(s), got shape {list(np.shape(arr))}")
    kind = flat.dtype.kind
    if dtype == "BYTES":
        if kind not in "OSU":
            raise RequestError(name, _shown(flat), "must be BYTES")
        values = [_text(v, name, limits.max_prompt_chars) for v in flat]
        return values[0] if dims[0] == 1 else values
    want = np.dtype(DTYPES[dtype].numpy).kind
    if want == "i" and kind not in "iu":
        raise RequestError(name, _shown(flat), f"must be {dtype}")
    if want == "f" and kind not in "f":
        raise RequestError(name, _shown(flat), "must be FP32")
    values = [v.item() for v in flat]
    return values[0] if dims[0] == 1 else tuple(values)


def request_from_arrays(arrays: Mapping[str, np.ndarray], limits: Limits = Limits()) -> tuple[GenerateRequest, int]:
    """Request tensors (numpy, as Triton delivers them) -> ``GenerateRequest`` and preview interval.

    Counts and lengths are checked before any text is decoded (``limits``: the repository's).
    """
    unknown = set(arrays) - set(REQUEST_INPUTS)
    if unknown:
        raise RequestError(sorted(unknown)[0][:64], None, f"unknown input; inputs are {sorted(REQUEST_INPUTS)}")
    prompt = arrays.get("prompt")
    if prompt is None:
        raise RequestError("prompt", None, "is required")
    prompt = np.asarray(prompt).reshape(-1)
    if prompt.dtype.kind not in "OSU":
        raise RequestError("prompt", _shown(prompt), "must be BYTES")
    if prompt.size > limits.max_prompts:
        raise RequestError("prompt", f"{prompt.size} prompts", f"at most {limits.max_prompts} prompts per request")
    texts = tuple(_text(p, "prompt" if i == 0 else f"prompt[{i}]", limits.max_prompt_chars) for i, p in enumerate(prompt))
    v = {name: _scalar(arrays, name, limits) for name in REQUEST_INPUTS if name != "prompt"}
    for name in ("guidance", "gamma_c", "gamma_s"):
        if v[name] is not None and not math.isfinite(v[name]):
            raise RequestError(name, v[name], "must be finite")
    req = GenerateRequest(
        prompts=texts, negative_prompt=v["negative_prompt"] or "",
        content=v["content"] or None, style=v["style"] or None,
        seed=0 if v["seed"] is None else v["seed"], steps=v["steps"], guidance=v["guidance"],
        height=v["height"], width=v["width"], gamma_c=v["gamma_c"], gamma_s=v["gamma_s"],
        mode=v["mode"] or None, scheduler=v["scheduler"] or None,
        content_window=v["content_window"], style_window=v["style_window"],
    )
    preview = v["preview_every"] or 0
    if preview < 0:
        raise RequestError("preview_every", preview, "must be >= 0")
    return req, preview


def _selectors(rows: Sequence) -> dict[str, object]:
    """Per row: which LoRAs (BYTES, b"" = none) at which gates; the ``unet`` model picks the weights."""
    return {"lora_content": np.array([(v.content or "").encode() for v in rows], dtype=np.object_),
            "lora_style": np.array([(v.style or "").encode() for v in rows], dtype=np.object_),
            "gate_c": torch.tensor([v.gamma_c for v in rows], dtype=torch.float32),
            "gate_s": torch.tensor([v.gamma_s for v in rows], dtype=torch.float32)}


class PipelineRuntime:
    """The CRAFT-LoRA pipeline over a model repository's networks."""

    def __init__(self, repo: RepoView, infer_many: InferMany, device: str = "cpu", *, unet_calls: str = "step"):
        from transformers import CLIPTokenizer

        if unet_calls not in UNET_CALLS:
            raise ValueError(f"unet_calls must be one of {UNET_CALLS}, got {unet_calls!r}")
        self.unet_calls = unet_calls
        self.repo = repo
        self.infer_many = infer_many
        self.device = torch.device(device)
        names = ["tokenizer", "tokenizer_2"] if repo.arch == "sdxl" else ["tokenizer"]
        self.tokenizers = [CLIPTokenizer.from_pretrained(repo.assets[n]) for n in names]
        self.scheduler_config = json.loads(Path(repo.assets["scheduler_config"]).read_text())
        self.latent_scale = repo.latent_scale
        self.latent_channels = repo.latent_channels

    @classmethod
    def from_repository(cls, root: Path, infer_many: InferMany, device: str = "cpu", *,
                        unet_calls: str = "step") -> "PipelineRuntime":
        return cls(read_manifest(root), infer_many, device, unet_calls=unet_calls)

    def plan(self, request: GenerateRequest) -> Plan:
        plan = plan_request(request, self.repo.catalog, self.repo.defaults, self.repo.limits)
        if self.repo.lora_mode == "runtime":  # the runtime network serves what is not baked
            return plan
        for group in plan.groups:
            needed = set(step_variants(group.config)) | {BASE}
            missing = sorted(str(v) for v in needed if self.repo.model_for(v) is None)
            if missing:
                c, s = group.config.content, group.config.style
                raise RequestError("style" if s else "content", f"{c}+{s}" if c and s else c or s,
                                   f"pair not exported (missing {missing}); exported pairs: "
                                   f"{['+'.join(p) for p in self.repo.pairs]}")
        return plan

    def encode(self, texts: Sequence[str], height: int, width: int) -> dict[str, torch.Tensor]:
        """Text encoder(s) via BLS, then SDXL micro-conditioning."""
        ids = tokenize(self.tokenizers, texts)
        names = ["text_encoder", "text_encoder_2"][: len(ids)]
        calls = [NetCall(self.repo.networks[n], {"input_ids": torch.from_numpy(i).to(self.device)},
                         ("hidden_states", "text_embeds") if n == "text_encoder_2" else ("hidden_states",))
                 for n, i in zip(names, ids)]
        outs = self.infer_many(calls)
        hiddens = [o["hidden_states"] for o in outs]
        pooled = outs[-1]["text_embeds"] if self.repo.arch == "sdxl" else None
        return build_conditioning(self.repo.arch, hiddens, pooled, height, width)

    def denoise(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        """The sampling loop's denoiser: each call on its variant's UNet model, all in flight at once;
        or, when one model serves every UNet weight set, the step's calls as one request to it.

        ``plan`` has checked that every variant the loop asks for has a model (baked mode).
        """
        if self.repo.unet_model:
            if self.unet_calls == "branch":  # one request per branch, in turn (never batched together)
                return [eps for c in calls for eps in self._denoise_one_model([c])]
            return self._denoise_one_model(calls)
        net_calls = [NetCall(self.repo.variants[c.variant], unet_inputs(c.x, c.t, c.cond), ("noise_pred",))
                     for c in calls]
        return [o["noise_pred"] for o in self.infer_many(net_calls)]

    def _denoise_one_model(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        """The step's calls (conditional + unconditional) as rows of one request to the ``unet`` model,
        each row naming its weights (:data:`craft_export.unet_runner.SELECTORS`); split at ``max_batch``."""
        parts = [unet_inputs(c.x, c.t, c.cond) for c in calls]
        sizes = [int(p["sample"].shape[0]) for p in parts]
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else dict(parts[0])
        rows = [c.variant for c, n in zip(calls, sizes) for _ in range(n)]
        merged.update(_selectors(rows))
        step = self.repo.engine.max_batch
        chunks = [{k: v[i:i + step] for k, v in merged.items()} for i in range(0, len(rows), step)]
        outs = self.infer_many([NetCall(self.repo.unet_model, chunk, ("noise_pred",)) for chunk in chunks])
        eps = torch.cat([o["noise_pred"] for o in outs]) if len(outs) > 1 else outs[0]["noise_pred"]
        return list(torch.split(eps, sizes))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        out = self.infer_many([NetCall(self.repo.networks["vae_decoder"], {"latent": latents}, ("image",))])[0]
        return to_uint8(out["image"])

    def generate(
        self,
        request: GenerateRequest,
        *,
        progress: Callable[[int, int, torch.Tensor], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, Plan]:
        """(N, H, W, 3) uint8 images in prompt order, and the plan (notes included)."""
        plan = self.plan(request)
        latent_shape = (self.latent_channels, plan.height // self.latent_scale, plan.width // self.latent_scale)

        def callback(step: int, total: int, latents: torch.Tensor) -> None:
            if cancelled is not None and cancelled():
                raise Cancelled(f"request cancelled by the client; stopped after step {step} of {total}")
            if progress is not None:
                progress(step, total, latents)

        images = run_plan(plan, self.encode, self.denoise, self.decode, latent_shape, self.scheduler_config,
                          device=self.device, callback=callback,
                          force_zeros_for_empty_prompt=self.repo.force_zeros_for_empty_prompt)
        return images, plan
