"""Invariants of the method's math: routing, gates, aggregation, ACFG, the loop, Rank-FT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from craft_ops.aggregate import BASE, Variant, aggregate, routed_deltas
from craft_ops.gates import GateError, Window, gate_schedule, parse_prompt, step_gates
from craft_ops.guidance import acfg, cfg
from craft_ops.rankft import merged_basis, orthonormal_basis, projection_residual, rank_schedule
from craft_ops.routing import PRESETS, Routing, RoutingError, resolve_routing
from craft_ops.sampling import SamplingConfig, make_scheduler, sample, step_variants

# -- routing (Eq. 7) and aggregation (Eq. 8) ----------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_presets_match_the_unet_and_are_disjoint(ref_pipes, arch):
    pipe = ref_pipes[arch]
    routing = PRESETS[arch]
    routing.check_against(list(pipe.shapes))
    sets = {m: routing.layer_set(m) for m in pipe.shapes}
    assert {"content", "style"} <= set(sets.values())
    for m, kind in sets.items():
        if kind == "content":
            assert not m.startswith("up_blocks.1") and not m.startswith("up_blocks.2")
    assert routing.layer_set("up_blocks.0.attentions.0.proj_in") == ("content" if arch == "sdxl" else "style")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_deltas_land_only_in_their_layer_set(ref_pipes, arch):
    pipe = ref_pipes[arch]
    for name in ("dog", "watercolor"):
        lora = pipe.loras[name]
        outside = [m for m in lora.adapter.modules if pipe.routing.layer_set(m) != lora.kind]
        assert outside, "demo LoRAs also carry deltas outside their own set"
        deltas = routed_deltas(lora.adapter, lora.kind, pipe.routing, pipe.shapes)
        assert deltas and all(pipe.routing.layer_set(m) == lora.kind for m in deltas)
        merged = aggregate(pipe.W_init, **{f"{lora.kind}_deltas": deltas})
        changed = {m for m in pipe.W_init if not torch.equal(merged[m], pipe.W_init[m])}
        assert changed == set(deltas)


def test_gamma_zero_is_bit_identical_and_inputs_untouched(ref_pipes):
    pipe = ref_pipes["sd15"]
    c = pipe.routed("dog")
    s = pipe.routed("watercolor")
    before = {m: w.clone() for m, w in pipe.W_init.items()}
    merged = aggregate(pipe.W_init, c, s, gamma_c=0.0, gamma_s=0.0)
    assert all(merged[m] is pipe.W_init[m] for m in merged)
    half = aggregate(pipe.W_init, c, s, gamma_c=0.5, gamma_s=0.0)
    for m, w in half.items():
        assert torch.equal(pipe.W_init[m], before[m])
        if m in c:
            assert torch.allclose(w, before[m] + 0.5 * c[m])
        else:
            assert w is pipe.W_init[m]
    assert Variant("dog", 0.0, "watercolor", 0.0) == BASE


def test_custom_routing_must_be_disjoint():
    r = resolve_routing({"content": ["down_blocks"], "style": ["up_blocks"]})
    assert r.layer_set("down_blocks.0.resnets.0.conv1") == "content"
    with pytest.raises(RoutingError, match="overlaps"):
        Routing("bad", content=("up_blocks",), style=("up_blocks.1",))
    with pytest.raises(RoutingError, match="unknown preset"):
        resolve_routing("sd3")
    with pytest.raises(RoutingError, match="matches no UNet module"):
        resolve_routing({"content": ["down_blocks.9"], "style": ["up_blocks"]}).check_against(["down_blocks.0.x", "up_blocks.0.y"])


# -- gates (Eq. 6, 9) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, gc, gs, text",
    [
        ("A dog <c> in watercolor style <s>", 1, 1, "A dog in watercolor style"),
        ("a toy bull <c> in fire style", 1, 0, "a toy bull in fire style"),
        ("<s>impressionist</s> landscape", 0, 1, "impressionist landscape"),
        ("a <C>cat</c>, oil painting < s >", 1, 1, "a cat, oil painting"),
        ("no tokens here", 0, 0, "no tokens here"),
        ("a <x> tag stays", 0, 0, "a <x> tag stays"),
    ],
)
def test_prompt_tokens(prompt, gc, gs, text):
    g = parse_prompt(prompt)
    assert (g.gamma_c, g.gamma_s, g.text) == (gc, gs, text)


def test_gate_overrides_checked():
    assert parse_prompt("a <c>", gamma_c=0.25).gamma_c == 0.25
    for bad in (-0.1, 1.5, float("nan"), float("inf"), "x"):
        with pytest.raises(GateError, match="gamma_c"):
            parse_prompt("a <c>", gamma_c=bad)


@pytest.mark.parametrize("n", [4, 20, 30, 50])
def test_windows_map_onto_any_step_count(n):
    content, style = Window(0.0, 0.7), Window(0.28, 1.0)
    c_steps, s_steps = content.steps(n), style.steps(n)
    assert c_steps == [i for i in range(1, n + 1) if (i - 1) / n < 0.7]
    assert s_steps == [i for i in range(1, n + 1) if (i - 1) / n >= 0.28]
    assert c_steps[0] == 1 and s_steps[-1] == n  # content starts first, style runs to the end
    assert set(c_steps) & set(s_steps) or n < 5  # overlap for the hand-over
    if n == 50:
        assert c_steps == list(range(1, 36)) and s_steps == list(range(15, 51))
    sched = gate_schedule(n, 1.0, 0.5, content, style)
    assert [i + 1 for i, (g, _) in enumerate(sched) if g] == c_steps
    assert all(s in (0.0, 0.5) for _, s in sched)


def test_bad_windows():
    for bad in ((0.5, 0.5), (0.7, 0.2), (-0.1, 0.5), (0.0, 1.1), (float("nan"), 1.0)):
        with pytest.raises(GateError):
            Window.of(bad)
    with pytest.raises(GateError, match="two fractions"):
        Window.of([0.1])
    assert step_gates(1, 1, 1.0, 1.0, Window(0.0, 0.7), Window(0.28, 1.0)) == (1.0, 0.0)


# -- guidance (Eq. 11) and the loop ------------------------------------------------------------


def test_acfg_equations():
    g = torch.Generator().manual_seed(0)
    ec, eu = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(acfg(ec, eu, 0.0), ec)
    assert torch.allclose(acfg(ec, eu, 6.5), 7.5 * ec - 6.5 * eu, atol=1e-5)
    assert torch.allclose(cfg(ec, eu, 6.5), eu + 7.5 * (ec - eu), atol=1e-5)


class RecordingDenoiser:
    """eps = k * x for every call; records what the loop asked for."""

    def __init__(self, k_cond=0.3, k_uncond=0.1):
        self.k = {"cond": k_cond, "uncond": k_uncond}
        self.calls: list[tuple[str, Variant, float]] = []

    def __call__(self, calls):
        out = []
        for c in calls:
            self.calls.append((c.cond, c.variant, float(c.t)))
            out.append(self.k[c.cond] * c.x)
        return out


def test_loop_matches_hand_computed_euler_trajectory():
    steps, omega = 5, 2.0
    config = SamplingConfig(steps=steps, omega=omega, content="dog", style="ink", gamma_c=1.0, gamma_s=1.0)
    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "timestep_spacing": "leading", "steps_offset": 1}
    scheduler = make_scheduler("euler", base)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    den = RecordingDenoiser()
    out = sample(den, scheduler, x0, "cond", "uncond", config)
    # by hand: Euler with sigmas s_i, model input x / sqrt(s^2 + 1), eps = k * input
    sigmas = make_scheduler("euler", base)
    sigmas.set_timesteps(steps)
    s = sigmas.sigmas.double()
    x = x0.double() * float(sigmas.init_noise_sigma)
    for i in range(steps):
        x_in = x / math.sqrt(float(s[i]) ** 2 + 1)
        eps = (1 + omega) * 0.3 * x_in - omega * 0.1 * x_in
        x = x + (s[i + 1] - s[i]) * eps
    assert torch.allclose(out.double(), x, rtol=1e-5, atol=1e-5)
    # branches: conditional on the gated variant, unconditional always W_init (Eq. 10)
    assert [v for c, v, _ in den.calls if c == "uncond"] == [BASE] * steps
    assert [v for c, v, _ in den.calls if c == "cond"] == step_variants(config)
    assert step_variants(config)[0] == Variant("dog", 1.0) and step_variants(config)[-1] == Variant(style="ink", gamma_s=1.0)


def test_cfg_mode_uses_same_weights_on_both_branches():
    config = SamplingConfig(steps=4, omega=1.0, mode="cfg", content="dog", gamma_c=1.0)
    den = RecordingDenoiser()
    sample(den, make_scheduler("ddim", {"num_train_timesteps": 1000}), torch.ones(1, 4, 2, 2), "cond", "uncond", config)
    conds = [v for c, v, _ in den.calls if c == "cond"]
    unconds = [v for c, v, _ in den.calls if c == "uncond"]
    assert conds == unconds and Variant("dog", 1.0) in conds


@pytest.mark.parametrize("mode", ["acfg", "cfg"])
def test_force_zeros_for_empty_prompt_zeroes_the_unconditional_branch(mode):
    """SDXL's force_zeros_for_empty_prompt: an empty negative prompt is never encoded; the unconditional
    branch gets zero context and pooled embeddings and the conditional branch's time ids, in both modes."""
    from craft_ops.conditioning import build_conditioning, run_plan
    from craft_ops.request import GenerateRequest, LoraInfo, plan_request

    encoded: list[tuple[str, ...]] = []

    def encode(texts, height, width):
        encoded.append(tuple(texts))
        hidden = torch.full((len(texts), 77, 8), 2.0)
        return build_conditioning("sdxl", [hidden], torch.full((len(texts), 4), 3.0), height, width)

    seen = []

    def denoise(calls):
        seen.append([(c.variant, {k: v.clone() for k, v in c.cond.items()}) for c in calls])
        return [0.1 * c.x for c in calls]

    catalog = {"dog": LoraInfo("dog", "content", None)}
    for negative, zeros in (("", True), (" ", False)):
        encoded.clear(), seen.clear()
        request = GenerateRequest(prompts=("a dog <c>", "a cat <c>"), negative_prompt=negative, content="dog",
                                  steps=3, guidance=2.0, height=64, width=96, mode=mode)
        plan = plan_request(request, catalog)
        config = {"num_train_timesteps": 1000}
        images = run_plan(plan, encode, denoise, lambda x: np.zeros((x.shape[0], 2, 2, 3), np.uint8), (4, 8, 12),
                          config, force_zeros_for_empty_prompt=True)
        assert images.shape == (2, 2, 2, 3)
        assert encoded == ([] if zeros else [(negative,)]) + [("a dog", "a cat")]
        for (v_cond, cond), (v_uncond, uncond) in seen:
            assert v_uncond == (BASE if mode == "acfg" else v_cond)
            assert torch.equal(uncond["time_ids"], cond["time_ids"][:1])
            for name in ("encoder_hidden_states", "text_embeds"):
                assert uncond[name].shape[1:] == cond[name].shape[1:]
                assert bool((uncond[name] == 0).all()) is zeros, (negative, name)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_schedulers_run_deterministically(name):
    config = SamplingConfig(steps=6, omega=3.0, content="dog", gamma_c=1.0)
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        x0 = torch.randn(1, 4, 4, 4, generator=gen)
        outs.append(sample(RecordingDenoiser(), make_scheduler(name, {"num_train_timesteps": 1000}), x0, "cond",
                           "uncond", config, generator=gen))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_sampling_config_validation():
    for kwargs, match in (({"steps": 0, "omega": 1.0}, "steps"), ({"steps": 2, "omega": float("nan")}, "guidance"),
                          ({"steps": 2, "omega": 1.0, "mode": "x"}, "mode"),
                          ({"steps": 2, "omega": 1.0, "content_window": (0.5, 0.1)}, "content_window")):
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**kwargs)
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler("plms", {})


# -- Rank-FT (Eq. 1-4) ---------------------------------------------------------------------------


def test_rank_schedule_matches_eq2():
    r = rank_schedule(10, 128, 4)
    assert r[0] == 128 and r[-1] == 4 and r == sorted(r, reverse=True)
    assert rank_schedule(5, 64, 4) == [64, 49, 34, 19, 4]
    assert rank_schedule(1, 64, 4) == [64]
    for bad in ((0, 8, 4), (3, 4, 8), (3, 0, 0)):
        with pytest.raises(ValueError):
            rank_schedule(*bad)


def test_projection_removes_exactly_the_subspace():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(24, 16, generator=g)
    Q = orthonormal_basis(torch.randn(16, 5, generator=g))
    assert torch.allclose(Q.T @ Q, torch.eye(5), atol=1e-5)
    W = projection_residual(W0, Q)
    assert torch.allclose(W @ Q, torch.zeros(24, 5), atol=1e-5)  # no response inside span(Q)
    v = torch.randn(16, generator=g)
    v_perp = v - Q @ (Q.T @ v)
    assert torch.allclose(W @ v_perp, W0 @ v_perp, atol=1e-5)  # unchanged outside it
    conv = torch.randn(8, 4, 3, 3, generator=g)
    Qc = orthonormal_basis(torch.randn(36, 6, generator=g))
    assert projection_residual(conv, Qc).shape == conv.shape


def test_merged_basis():
    g = torch.Generator().manual_seed(1)
    Qc = orthonormal_basis(torch.randn(12, 4, generator=g))
    Qs = orthonormal_basis(torch.randn(12, 3, generator=g))
    Qm = merged_basis(Qc, Qs)
    assert Qm.shape == (12, 7) and torch.allclose(Qm.T @ Qm, torch.eye(7), atol=1e-5)
    for Q in (Qc, Qs):  # span(Q_merged) contains both
        assert torch.allclose(Qm @ (Qm.T @ Q), Q, atol=1e-5)
    assert merged_basis(Qc, Qc).shape[1] == 4  # dependent columns are dropped
