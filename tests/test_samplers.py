"""Every kohya sampler name (library/sdxl_schedulers.py and its _k / _multistep modules) against the diffusers
class kohya's get_my_scheduler constructs for it, step by step on the same model outputs: the timesteps,
the model-input scale and the latents after every model evaluation, for kohya's config (training samples)
and SDXL's scheduler config (sdxl_minimal_inference.py --sampler), epsilon and v-prediction. The "model"
is a fixed smooth function of the sample and the timestep (the scheduler is what is tested, and an output
that depends on the sample carries any wrong step into the following ones); the ancestral samplers get the
same noise on both sides (diffusers' randn_tensor draws from a twin of our numpy generator)."""
import numpy as np
import pytest

from conftest import assert_close  # noqa: E402  (imports library before mindspore)

from library.device_utils import UserError  # noqa: E402
from library.sdxl_schedulers_base import scaled_linear_betas  # noqa: E402
from library.sdxl_schedulers import (KOHYA_SAMPLERS, SCHEDULERS, check_sampler_name,  # noqa: E402
                                     get_kohya_scheduler, get_scheduler)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# The references step with this port's betas: torch's float32 linspace rounds differently by CPU (FMA or
# not) and is 1 ulp off numpy's at a third of the entries, which is not what these tests are about;
# test_scaled_linear_betas_match_torch bounds that difference on its own.
OUR_BETAS = dict(BETAS, trained_betas=scaled_linear_betas())
SDXL_CONFIG = dict(OUR_BETAS, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                   skip_prk_steps=True, interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0)

# kohya's get_my_scheduler (library/train_util.py), name -> (diffusers class, extra init args)
KOHYA_MAP = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
# the fix diffusers' own error message names for algorithm_type dpmsolver (see test_kohya_dpmsolver_...)
DPMSOLVER_FIX = {"final_sigmas_type": "sigma_min"}
NEW = ("pndm", "lms", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsingle")  # one name per new class
ANCESTRAL = {"dpm_2_a": "scheduling_k_dpm_2_ancestral_discrete", "k_dpm_2_a": "scheduling_k_dpm_2_ancestral_discrete",
             "euler_a": "scheduling_euler_ancestral_discrete", "k_euler_a": "scheduling_euler_ancestral_discrete"}
WORST = {}  # name/config -> largest error seen relative to max(1, |reference|) (printed with -s)


def test_scaled_linear_betas_match_torch():
    """The betas (and so every sigma) are diffusers' scaled_linear ones within 3 ulp of float32 (the square
    roots' linspace within 1 ulp)."""
    ref = diffusers.EulerDiscreteScheduler(**BETAS)
    ours = scaled_linear_betas()
    assert ours.dtype == np.float32
    assert np.abs(ours.view(np.int32) - ref.betas.numpy().view(np.int32)).max() <= 3
    assert np.abs(diffusers.EulerDiscreteScheduler(**OUR_BETAS).betas.numpy() - ours).max() == 0


def _kohya_reference(name, v_pred):
    cls_name, extra = KOHYA_MAP[name]
    extra = dict(extra, **({"prediction_type": "v_prediction"} if v_pred else {}))
    if name == "dpmsolver":
        extra.update(DPMSOLVER_FIX)
    ref = getattr(diffusers, cls_name)(**OUR_BETAS, **extra)
    if hasattr(ref.config, "clip_sample") and ref.config.clip_sample is False:  # kohya forces it on
        ref.config.clip_sample = True
    return ref


def _sdxl_reference(name, v_pred):
    cls_name, extra = KOHYA_MAP[name]
    cfg = dict(SDXL_CONFIG, **extra, prediction_type="v_prediction" if v_pred else "epsilon")
    if name == "dpmsolver":
        cfg.update(DPMSOLVER_FIX)
    return getattr(diffusers, cls_name).from_config(cfg)


def fake_model(x, t):
    """A deterministic stand-in for the U-Net: smooth in the sample, different at every timestep."""
    t = np.float32(t)
    grid = np.linspace(-1.0, 1.0, x.size, dtype=np.float32).reshape(x.shape)
    return (np.tanh(np.float32(0.4) * x) * (np.float32(0.8) + t / np.float32(2000))
            + np.float32(0.3) * np.sin(grid * np.float32(3) + t / np.float32(150))).astype(np.float32)


def _run_both(ref, ours, n, name, monkeypatch, seed=0):
    """Drive both schedulers as Generator.sample / kohya's pipeline do; -> the largest relative error."""
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    # KDPM2's midpoint timesteps come from float32 log/exp/pow, which numpy and torch round differently in
    # the last bit: 1e-6 relative (0.0006 at t=999), and a midpoint at the smallest training sigma lands a
    # hair above t=0 (6e-5) on one side and at 0 on the other; every other timestep is equal
    np.testing.assert_allclose(np.asarray(ours.timesteps, np.float64), ref.timesteps.numpy().astype(np.float64),
                               rtol=1e-6, atol=1e-4, err_msg=f"{name}: timesteps")
    assert len(ours.timesteps) == len(ref.timesteps)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2e-6)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    noise_ours, noise_ref = np.random.default_rng(seed + 100), np.random.default_rng(seed + 100)
    if name in ANCESTRAL:
        import importlib
        module = importlib.import_module(f"diffusers.schedulers.{ANCESTRAL[name]}")
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **k: torch.from_numpy(
            noise_ref.standard_normal(tuple(shape), dtype=np.float32)))
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        model_in = ref.scale_model_input(x_ref, t)
        ours_in = ours.scale_model_input(x, i)
        worst = max(worst, assert_close(ours_in, model_in.numpy(), 1e-5, f"{name} n={n}: model input {i}")
                    / max(1.0, float(model_in.abs().max())))
        eps = fake_model(model_in.numpy(), float(t))  # the reference's input: a step error is not fed back
        x_ref = ref.step(torch.from_numpy(eps), t, x_ref).prev_sample
        x = ours.step(eps, i, x, noise_ours)
        worst = max(worst, assert_close(x, x_ref.numpy(), 1e-5, f"{name} n={n}: latents after evaluation {i}")
                    / max(1.0, float(x_ref.abs().max())))
    return worst


@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("name", sorted(KOHYA_SAMPLERS))
def test_kohya_sampler_matches_diffusers_every_step(name, v_pred, monkeypatch):
    """--sample_sampler NAME: kohya's class and config, 4, 7 (odd), 10 and 20 steps (and 1 where it runs)."""
    for n in ((4, 7, 10, 20) if name == "pndm" else (1, 4, 7, 10, 20)):
        worst = _run_both(_kohya_reference(name, v_pred), get_kohya_scheduler(name, v_pred), n, name, monkeypatch,
                          seed=n)
        key = f"kohya {name} {'v' if v_pred else 'eps'}"
        WORST[key] = max(worst, WORST.get(key, 0.0))


@pytest.mark.parametrize("v_pred", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("name", NEW)
def test_sdxl_config_sampler_matches_diffusers_every_step(name, v_pred, monkeypatch):
    """sdxl_minimal_inference.py --sampler NAME: the class with SDXL's scheduler_config.json (leading spacing,
    steps_offset 1, no clipping, PNDM's skip_prk_steps)."""
    for n in (1, 5, 10, 16):
        ours = get_scheduler(name, prediction_type="v_prediction" if v_pred else "epsilon")
        worst = _run_both(_sdxl_reference(name, v_pred), ours, n, name, monkeypatch, seed=n)
        key = f"sdxl {name} {'v' if v_pred else 'eps'}"
        WORST[key] = max(worst, WORST.get(key, 0.0))


def test_second_order_samplers_evaluate_the_model_twice_per_step():
    """diffusers' longer timestep lists, which Generator.sample walks: 2n-1 for Heun/KDPM2, n+9 for PNDM with
    its Runge-Kutta warm-up (kohya), n+1 with skip_prk_steps (SDXL's config)."""
    for name in ("heun", "dpm_2", "dpm_2_a"):
        assert len(get_kohya_scheduler(name).set_timesteps(10)) == 19
    assert len(get_kohya_scheduler("pndm").set_timesteps(10)) == 19
    assert len(get_scheduler("pndm").set_timesteps(10)) == 11
    for name in ("lms", "dpmsingle", "dpmsolver"):
        assert len(get_kohya_scheduler(name).set_timesteps(10)) == 10


def test_kohya_heun_clips_x0():
    """kohya forces clip_sample on for every class that has it: Heun's x0 is clipped to [-1, 1] there, and
    the forced flag changes the result (a large model output drives x0 far out of range)."""
    ours, ref = get_kohya_scheduler("heun"), _kohya_reference("heun", False)
    assert ours.clip_sample and ref.config.clip_sample
    ours.set_timesteps(3)
    ref.set_timesteps(3)
    x = np.full((1, 4, 2, 2), 5.0, np.float32)
    eps = np.full_like(x, -3.0)
    got = ours.step(eps, 0, x)
    np.testing.assert_allclose(got, ref.step(torch.from_numpy(eps), ref.timesteps[0], torch.from_numpy(x))
                               .prev_sample.numpy(), rtol=1e-6)
    unclipped = get_scheduler("heun", timestep_spacing="linspace", steps_offset=0)
    unclipped.set_timesteps(3)
    assert not np.allclose(unclipped.step(eps, 0, x), got)


def test_kohya_dpmsolver_is_refused_by_diffusers_as_kohya_builds_it():
    """kohya's dpmsolver is DPMSolverMultistepScheduler(algorithm_type="dpmsolver") with the class default
    final_sigmas_type zero, which diffusers refuses (so kohya's own sample_images fails with it); this port
    runs it with sigma_min, the value diffusers' message names, and says so in its class."""
    with pytest.raises(ValueError, match="final_sigmas_type.*sigma_min"):
        diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver")
    ours = get_kohya_scheduler("dpmsolver")
    assert (ours.algorithm_type, ours.final_sigmas_type) == ("dpmsolver", "sigma_min")
    assert get_kohya_scheduler("dpmsolver++").final_sigmas_type == "zero"


def test_pndm_with_runge_kutta_needs_four_steps():
    """diffusers' PNDM without skip_prk_steps cannot build its warm-up for fewer than 4 steps (a broadcasting
    error); here a clear UserError."""
    with pytest.raises(ValueError):
        diffusers.PNDMScheduler(**BETAS).set_timesteps(3)
    with pytest.raises(UserError, match="pndm needs at least 4 steps"):
        get_kohya_scheduler("pndm").set_timesteps(3)


def test_every_kohya_name_is_registered():
    assert set(SCHEDULERS) == set(KOHYA_SAMPLERS)
    for name in KOHYA_SAMPLERS:
        assert type(get_kohya_scheduler(name)).__name__ == KOHYA_MAP[name][0].replace(
            "DPMSolverMultistepScheduler", "DPMSolverScheduler" if name == "dpmsolver" else
            "DPMSolverMultistepScheduler")
    assert check_sampler_name("K_DPM_2_A") == "k_dpm_2_a"
    with pytest.raises(UserError, match="--sampler ddpm: supported samplers are euler, k_euler"):
        check_sampler_name("ddpm")  # kohya took it out of its options (its samples come out wrong)


def test_report_worst_errors():
    """Runs last in this file: prints the largest per-step error of each sampler seen above (pytest -s)."""
    for key in sorted(WORST):
        print(f"{key}: {WORST[key]:.3g}")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", ["ddim", "euler", "lms", "heun", "dpm_2", "dpm_2_a", "dpmsolver++", "dpmsingle"])
def test_timesteps_match_diffusers_in_every_spacing(name, spacing):
    """Each scheduler family's timesteps (and sigmas where it keeps them) equal diffusers' for the three
    timestep spacings and step counts that do and do not divide 1000."""
    if name == "dpmsingle" and spacing != "linspace":
        pytest.skip("diffusers' DPMSolverSinglestepScheduler spaces linspace only")
    cls_name, extra = KOHYA_MAP[name]
    for n in (1, 7, 30):
        offset = 1 if spacing == "leading" else 0
        ref = getattr(diffusers, cls_name).from_config(dict(SDXL_CONFIG, **extra, timestep_spacing=spacing,
                                                            steps_offset=offset))
        ref.set_timesteps(n)
        ours = get_scheduler(name, timestep_spacing=spacing, steps_offset=offset)
        ours.set_timesteps(n)
        np.testing.assert_allclose(np.asarray(ours.timesteps, np.float64), ref.timesteps.numpy(), rtol=0, atol=1e-3)
        if hasattr(ours, "sigmas"):
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
