"""Helpers of the fidelity tests: run diffusers' own pipelines the way a user would, on the tiny folders.

The diffusers side is restated here on purpose (scheduler classes and arguments, seed noise),
so the tests compare the project against diffusers, not against itself.
"""

from __future__ import annotations

import numpy as np
import torch

# scheduler name -> (diffusers class, from_config keyword arguments), as a diffusers user swaps schedulers
DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # the tiny folders' config (like SD 1.5's own) runs DDIM without x0 clipping and alpha_T = alpha_0
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
}


def load_diffusers(folder, arch: str):
    import diffusers

    if arch == "sd15":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, prompt: str, *, scheduler: str, seed: int, steps: int, omega: float,
                     size: int = 64, negative: str | None = "", **call) -> np.ndarray:
    """(1, H, W, 3) uint8 from diffusers with the seed noise of DESIGN-NOTES 8.

    The initial latents come from ``torch.Generator("cpu").manual_seed(seed)``; the same
    generator, advanced past them, drives ancestral noise; DPM++ SDE's Brownian tree is seeded
    with that generator's next draw (the project's ``sde_noise_seed``). ``negative=None`` lets
    the pipeline choose its own unconditional embedding (SDXL: zeros when the folder sets
    ``force_zeros_for_empty_prompt``).
    """
    import diffusers

    cls_name, kwargs = DIFFUSERS_SCHEDULERS[scheduler]
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=g, dtype=torch.float32)
    if cls_name == "DPMSolverSDEScheduler":
        kwargs = {**kwargs, "noise_sampler_seed": int(torch.randint(0, 2**31 - 1, (1,), generator=g))}
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **kwargs)
    try:
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=1.0 + omega,
                   height=size, width=size, latents=latents, generator=g, output_type="np", **call).images
    finally:
        pipe.scheduler = original
    return (out * 255.0).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())
