"""Same picture as diffusers: the project's sampling loop (``--mode cfg``, no LoRA) against diffusers'
own pipelines on the tiny folders, for every scheduler the server offers (max difference 1/255)."""

from __future__ import annotations

import json
import shutil

import pytest

from craft_reference.pipeline import ReferencePipeline
from craft_ops.request import GenerateRequest
from craft_ops.routing import resolve_routing
import torch

from craft_ops.sampling import SCHEDULERS, SamplingConfig, make_scheduler, sample, step_variants
from fidelity_util import DIFFUSERS_SCHEDULERS, diffusers_images, load_diffusers, max_diff, mean_diff

STEPS = 4


def _request(scheduler, omega, seed=5, prompt="a photo of a dog", negative=""):
    return GenerateRequest(prompts=(prompt,), negative_prompt=negative, seed=seed, steps=STEPS, guidance=omega,
                           height=64, width=64, mode="cfg", scheduler=scheduler)


@pytest.fixture(scope="module")
def sd15(demo_dir):
    folder = demo_dir / "sd15-tiny"
    return ReferencePipeline.from_folder(folder, resolve_routing("sd15")), load_diffusers(folder, "sd15")


def test_every_scheduler_is_restated_for_diffusers():
    assert set(DIFFUSERS_SCHEDULERS) == set(SCHEDULERS)


_IMAGES: dict[str, object] = {}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sd15_matches_diffusers(sd15, scheduler):
    ref, pipe = sd15
    ours = ref.generate(_request(scheduler, 6.5))
    theirs = diffusers_images(pipe, "a photo of a dog", scheduler=scheduler, seed=5, steps=STEPS, omega=6.5)
    assert max_diff(ours, theirs) <= 1, scheduler
    _IMAGES[scheduler] = ours


def test_the_schedulers_differ():
    """The comparisons have teeth: each scheduler's picture differs from Euler's (DDIM with eta 0 is
    the same ODE step as Euler, so only barely)."""
    if len(_IMAGES) < len(SCHEDULERS):
        pytest.skip("needs every test_sd15_matches_diffusers case in this session")
    for name, image in _IMAGES.items():
        if name != "euler":
            assert mean_diff(image, _IMAGES["euler"]) > (0.02 if name == "ddim" else 0.5), name


@pytest.fixture(scope="module")
def sdxl(demo_dir):
    folder = demo_dir / "sdxl-tiny"
    return ReferencePipeline.from_folder(folder, resolve_routing("sdxl")), load_diffusers(folder, "sdxl")


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sdxl_matches_diffusers(sdxl, scheduler):
    """diffusers' default SDXL call (no negative prompt): the folder's ``force_zeros_for_empty_prompt``
    (true, as in the released SDXL base) gives zero unconditional embeddings on both sides."""
    ref, pipe = sdxl
    ours = ref.generate(_request(scheduler, 4.0))
    theirs = diffusers_images(pipe, "a photo of a dog", scheduler=scheduler, seed=5, steps=STEPS, omega=4.0,
                              negative=None)
    assert max_diff(ours, theirs) <= 1, scheduler


def test_sdxl_empty_negative_follows_force_zeros_for_empty_prompt(sdxl, demo_dir, tmp_path):
    """An empty negative prompt follows the folder's setting (zeros when true, the encoded empty string
    when false); a blank one (" ") is encoded, as diffusers' explicit ``negative_prompt=""`` is."""
    ref, pipe = sdxl
    assert ref.force_zeros_for_empty_prompt is True
    zeros = ref.generate(_request("euler", 4.0))
    blank = ref.generate(_request("euler", 4.0, negative=" "))
    encoded = diffusers_images(pipe, "a photo of a dog", scheduler="euler", seed=5, steps=STEPS, omega=4.0,
                               negative="")
    assert max_diff(blank, encoded) <= 1
    assert mean_diff(zeros, blank) > 1.0  # the setting moves the picture
    # the same folder with the setting off: an empty negative prompt is encoded, as diffusers does
    folder = tmp_path / "sdxl-no-zeros"
    shutil.copytree(demo_dir / "sdxl-tiny", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    off = ReferencePipeline.from_folder(folder, resolve_routing("sdxl"))
    assert off.force_zeros_for_empty_prompt is False
    ours = off.generate(_request("euler", 4.0))
    theirs = diffusers_images(load_diffusers(folder, "sdxl"), "a photo of a dog", scheduler="euler", seed=5,
                              steps=STEPS, omega=4.0, negative=None)
    assert max_diff(ours, theirs) <= 1 and max_diff(ours, blank) <= 1


@pytest.mark.filterwarnings("ignore:.*steps_offset")
def test_checkpoint_scheduler_config_is_honoured(demo_dir, tmp_path):
    """v-prediction, trailing spacing and zero terminal SNR from the folder's scheduler config."""
    folder = tmp_path / "sd15-vpred"
    shutil.copytree(demo_dir / "sd15-tiny", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                  steps_offset=0)
    config_file.write_text(json.dumps(config))
    ref = ReferencePipeline.from_folder(folder, resolve_routing("sd15"))
    pipe = load_diffusers(folder, "sd15")
    for scheduler in ("euler", "ddim", "dpmpp_2m", "unipc"):
        ours = ref.generate(_request(scheduler, 6.5))
        theirs = diffusers_images(pipe, "a photo of a dog", scheduler=scheduler, seed=5, steps=STEPS, omega=6.5)
        assert max_diff(ours, theirs) <= 1, scheduler
    assert make_scheduler("euler", config).config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="dpmpp_sde.*rescale_betas_zero_snr"):
        make_scheduler("dpmpp_sde", config)


def test_vae_latent_statistics_decode_as_diffusers(sdxl, demo_dir, tmp_path):
    """A VAE config with latents_mean / latents_std (and a shift_factor neither pipeline reads): SDXL
    decodes ``latents * std / scaling_factor + mean`` as StableDiffusionXLPipeline does; SD 1.5's
    pipeline ignores the statistics, and so does the SD 1.5 decoder here."""
    from craft_export.networks import VaeDecoderNet

    stats = {"latents_mean": [0.3, -0.2, 0.1, 0.5], "latents_std": [0.8, 1.3, 0.9, 1.1], "shift_factor": 0.4}
    folder = tmp_path / "sdxl-stats"
    shutil.copytree(demo_dir / "sdxl-tiny", folder)
    config_file = folder / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **stats}))
    ref = ReferencePipeline.from_folder(folder, resolve_routing("sdxl"))
    assert ref.vae.has_latent_stats
    ours = ref.generate(_request("euler", 4.0))
    theirs = diffusers_images(load_diffusers(folder, "sdxl"), "a photo of a dog", scheduler="euler", seed=5,
                              steps=STEPS, omega=4.0, negative=None)
    assert max_diff(ours, theirs) <= 1
    plain = sdxl[0].generate(_request("euler", 4.0))  # the same folder without the statistics
    assert mean_diff(ours, plain) > 1.0
    vae = ref.parts.vae
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(VaeDecoderNet(vae, "sd15")(latents),
                       (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1))
    # the exported decoder (what the server runs) carries the statistics
    from craft_export.network_specs import network_specs
    from craft_export.onnx_export import example_inputs, export_onnx
    from craft_export.parity import run_parity

    spec = network_specs("sdxl", ref.parts)["vae_decoder"]
    export_onnx(ref.vae, spec, example_inputs(spec, hw=(64, 64), batch=2), tmp_path / "vae" / "model.onnx")
    report = run_parity(ref.vae, tmp_path / "vae" / "model.onnx", spec, [example_inputs(spec, hw=(64, 96), seed=3)])
    assert report["worst_abs_err"] < 1e-4


class _Linear:
    """eps = k * x on each branch; records the variant of every conditional call."""

    def __init__(self):
        self.variants = []

    def __call__(self, calls):
        self.variants.append(calls[0].variant)
        return [0.3 * calls[0].x, 0.1 * calls[1].x]


def test_sde_loop_steps_gates_and_seeded_noise():
    """DPM++ SDE: 2N - 1 evaluations, both of a step on that step's gates, N callbacks; the Brownian
    noise follows the request generator and nothing else."""
    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    config = SamplingConfig(steps=5, omega=2.0, content="dog", gamma_c=1.0, content_window=(0.0, 0.5))
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def run(gen_seed):
        den, seen = _Linear(), []
        out = sample(den, make_scheduler("dpmpp_sde_karras", base), x0, "c", "u", config,
                     generator=torch.Generator().manual_seed(gen_seed), callback=lambda i, n, x: seen.append(i))
        return out, den.variants, seen

    a, variants, seen = run(3)
    per_step = step_variants(config)
    assert variants == [v for v in per_step[:-1] for _ in range(2)] + [per_step[-1]]
    assert seen == [1, 2, 3, 4, 5]
    assert torch.equal(a, run(3)[0])
    assert (a - run(4)[0]).abs().max() > 1e-3  # same start, other Brownian path
