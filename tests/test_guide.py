"""The guide: sites and shapes matching the model, prior-relative start, the paper's
encoder size, antipodal pose densities, conditioning and fixed latents."""

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from pyro import poutine

from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.guide import ORDER, PAPER_ARCHITECTURE, Guide, GuideConfig, condition_sites
from cryosvi.latents import guide_priors, legacy_guide_priors, parse_latents
from cryosvi.model import SITES, model
from cryosvi.reference import Reference
from cryosvi.physics.rotations import random_quaternions


def tiny_reference(n_modes: int = 1, snr: float = 20.0, box: int = 16) -> Reference:
    """A small random molecule (30 pseudo-atoms, radius 25 Å) in a 16 px x 5 Å box, with
    random orthonormal modes: no structure file or ANM needed."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(30, 3))
    coords = direction / np.linalg.norm(direction, axis=1, keepdims=True) \
        * 25 * rng.uniform(0.2, 1, size=(30, 1)) ** (1 / 3)
    coords -= coords.mean(0)
    modes, _ = np.linalg.qr(rng.normal(size=(90, n_modes)))
    return Reference(
        coords=coords.astype(np.float32), centroid=np.zeros(3),
        modes=modes.T.reshape(n_modes, 30, 3).astype(np.float32),
        eigenvalues=np.arange(1, n_modes + 1, dtype=float),
        optics=Optics(box=box, pixel_size=5.0), imaging=Imaging(sigma=4.0, window=5),
        priors=Priors(mode_std=(2.0,) * n_modes, defocus_mean=10000.0, defocus_std=2500.0),
        noise=Noise(snr=snr), source={"test": True})


PRIOR_KEYWORDS = ("defocus_mean", "defocus_std", "mode_std", "shift_std")


def tiny_config(**changes) -> GuideConfig:
    """A small guide's config; the prior keywords (``PRIOR_KEYWORDS``) set the numbers of
    ``latent_priors`` that the heads are relative to."""
    priors = {k: changes.pop(k) for k in PRIOR_KEYWORDS if k in changes}
    values = dict(box=16, n_modes=1, channels=(4, 8, 8), hidden=32, n_components=2,
                  input_scale=1.0, optics=Optics(box=16, pixel_size=5.0).__dict__)
    values.update(changes)
    values["latent_priors"] = {**guide_priors(Priors(), values.get("ctf_estimates", False)),
                               **legacy_guide_priors(priors)}
    return GuideConfig(**values)


def traces(guide: Guide, reference: Reference, images, known=None):
    forward = reference.forward_model()
    conditioned = poutine.condition(model, data=known) if known else model
    guide_trace = poutine.trace(guide.pyro_guide(known)).get_trace(
        forward, reference.priors, 0.1, images=images)
    model_trace = poutine.trace(poutine.replay(conditioned, trace=guide_trace)).get_trace(
        forward, reference.priors, 0.1, images=images)
    return model_trace, guide_trace


def latent_sites(trace):
    return {name: node for name, node in trace.nodes.items()
            if node["type"] == "sample" and not node["is_observed"]
            and type(node["fn"]).__name__ != "_Subsample"}  # the plate's index site


def test_sites_and_shapes_match_the_model():
    torch.manual_seed(0)
    reference = tiny_reference(n_modes=2)
    guide = Guide(tiny_config(n_modes=2, mode_std=(2.0, 2.0)))
    images = torch.randn(5, 16, 16)
    model_trace, guide_trace = traces(guide, reference, images)
    guide_sites, model_sites = latent_sites(guide_trace), latent_sites(model_trace)
    assert set(guide_sites) == set(SITES) == set(model_sites)
    for name in SITES:
        assert guide_sites[name]["value"].shape == model_sites[name]["value"].shape
        assert guide_sites[name]["fn"].batch_shape == (5,)
    assert guide_sites["enm_scale"]["value"].shape == (5, 2)
    assert guide_sites["rotation"]["value"].shape == (5, 4)
    assert guide_sites["defocus"]["value"].shape == (5,)
    torch.testing.assert_close(guide_sites["rotation"]["value"].norm(dim=-1), torch.ones(5))
    assert model_trace.nodes["measurement"]["is_observed"]


def test_fixed_latents_are_left_out_of_the_guide():
    torch.manual_seed(0)
    reference = tiny_reference()
    guide = Guide(tiny_config(latents=("defocus", "enm_scale")))
    images = torch.randn(3, 16, 16)
    known = {"rotation": random_quaternions(3)}
    model_trace, guide_trace = traces(guide, reference, images, known)
    assert set(latent_sites(guide_trace)) == {"defocus", "enm_scale"}
    assert model_trace.nodes["rotation"]["is_observed"]
    torch.testing.assert_close(model_trace.nodes["rotation"]["value"], known["rotation"])
    # The known pose feeds the later (mode) encoder.
    assert condition_sites("enm_scale", guide.config) == ("defocus", "rotation")


def test_an_untrained_guide_is_the_prior():
    guide = Guide(tiny_config(defocus_mean=12000.0, defocus_std=2000.0, mode_std=(3.0,)))
    _, _, dists = guide.sample(torch.randn(4, 16, 16), n_samples=1)
    torch.testing.assert_close(dists["defocus"].mean, torch.full((1, 4), 12000.0))
    torch.testing.assert_close(dists["defocus"].stddev, torch.full((1, 4), 2000.0),
                               rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(dists["enm_scale"].mean, torch.zeros(1, 4, 1))
    torch.testing.assert_close(dists["enm_scale"].stddev, torch.full((1, 4, 1), 3.0),
                               rtol=1e-5, atol=1e-5)
    concentration = dists["rotation"].component_distribution.concentration
    torch.testing.assert_close(concentration.norm(dim=-1), torch.full((1, 4, 2), 2.0))


def test_paper_encoders_have_the_papers_size():
    guide = Guide(GuideConfig(**asdict(PAPER_ARCHITECTURE), box=32, n_modes=1))
    sizes = {site: sum(p.numel() for p in encoder.parameters())
             for site, encoder in guide.encoders.items()}
    assert guide.encoders["defocus"].n_features == 2048  # the paper's "2048"
    for site, size in sizes.items():
        assert 1.55e6 < size < 1.65e6, (site, size)  # the paper: 1.6 M per network
    assert guide.parameter_count() == sum(sizes.values())


def test_default_layout_is_the_measured_one():
    """The defaults are the demo's guide: 1 109 036 parameters at the paper preset (README
    "Demo"); with gates as wide as the MLP 1 333 100; without BatchNorm and the
    conditioning gate: 1 066 380."""
    assert Guide(GuideConfig(box=32, n_modes=1)).parameter_count() == 1_109_036
    wide_gates = GuideConfig(box=32, n_modes=1, gate_hidden=None)
    assert Guide(wide_gates).parameter_count() == 1_333_100
    before = GuideConfig(box=32, n_modes=1, batch_norm=False, gated_conditioning=False)
    assert Guide(before).parameter_count() == 1_066_380


OLDER = {"batch_norm": False, "gated_conditioning": False}
WIDE_GATES = {"batch_norm": True, "gated_conditioning": True, "gate_hidden": None}


@pytest.mark.parametrize("layout_then, missing", [
    (OLDER, ("batch_norm", "gated_conditioning", "gate_hidden")),
    (OLDER, ("shared_trunk", "phase_flip", "batch_norm", "gated_conditioning",
             "gate_hidden")),
    (WIDE_GATES, ("gate_hidden",))])
def test_a_run_saved_before_a_field_existed_loads_unchanged(layout_then, missing):
    """A run.json from before a field existed gets that time's value, so the weights it
    saved load strictly and give the same posterior."""
    torch.manual_seed(0)
    layout = {"channels": (4, 8, 8), "hidden": 16, "n_components": 2, "shared_trunk": False,
              "phase_flip": False, **layout_then}
    saved_guide = Guide(tiny_config(**layout))
    for parameter in saved_guide.parameters():  # a trained guide: non-zero heads
        torch.nn.init.normal_(parameter, std=0.1)
    saved = saved_guide.config.to_dict()
    for key in missing:
        del saved[key]
    loaded = Guide(GuideConfig.from_dict(saved))
    loaded.load_state_dict(saved_guide.state_dict())  # strict: same modules
    images = torch.randn(3, 16, 16)
    values = {"defocus": torch.full((3,), 9000.0), "rotation": random_quaternions(3),
              "enm_scale": torch.ones(3, 1)}
    saved_guide.eval(), loaded.eval()
    for site, log_q in saved_guide.log_prob(images, values).items():
        torch.testing.assert_close(loaded.log_prob(images, values)[site], log_q)


def test_pose_density_is_antipodal_and_finite_far_from_the_mean():
    guide = Guide(tiny_config())
    last = guide.encoders["rotation"].rest[-1]
    with torch.no_grad():
        last.bias[8:10] = math.log(5000.0)  # very concentrated components
    images = torch.randn(3, 16, 16)
    q = random_quaternions(3)
    _, _, dists = guide.sample(images, n_samples=1)
    pose = dists["rotation"]
    log_p, log_p_flipped = pose.log_prob(q), pose.log_prob(-q)
    torch.testing.assert_close(log_p, log_p_flipped)
    assert torch.isfinite(log_p).all()
    values = {"defocus": torch.full((3,), 10000.0), "rotation": q,
              "enm_scale": torch.zeros(3, 1)}
    loss = -sum(guide.log_prob(images, values).values()).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in guide.parameters() if p.grad is not None)


def test_conditioning_feeds_earlier_latents_into_later_encoders():
    torch.manual_seed(0)
    images = torch.randn(2, 16, 16)
    q = random_quaternions(2)

    def pose_log_prob(guide, defocus):
        values = {"defocus": torch.full((2,), defocus), "rotation": q,
                  "enm_scale": torch.zeros(2, 1)}
        return guide.log_prob(images, values)["rotation"]

    conditioned = Guide(tiny_config())
    for p in conditioned.parameters():  # leave the prior start
        torch.nn.init.normal_(p, std=0.3)
    assert not torch.allclose(pose_log_prob(conditioned, 8000.0),
                              pose_log_prob(conditioned, 12000.0))
    independent = Guide(tiny_config(conditioning=False))
    for p in independent.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.testing.assert_close(pose_log_prob(independent, 8000.0),
                               pose_log_prob(independent, 12000.0))
    assert condition_sites("rotation", conditioned.config) == ("defocus",)
    assert condition_sites("enm_scale", conditioned.config) == ("defocus", "rotation")
    assert condition_sites("rotation", independent.config) == ()


def test_phase_flip_multiplies_by_the_sign_of_the_ctf():
    guide = Guide(tiny_config(phase_flip=True, shared_trunk=False))  # one image per trunk
    images = torch.randn(3, 16, 16, dtype=torch.float64)
    defocus = torch.tensor([5000.0, 10000.0, 20000.0], dtype=torch.float64)
    once = guide.phase_flipped(images, defocus)
    assert not torch.allclose(once, images)
    # Flipping twice restores every Fourier coefficient where the CTF is not zero.
    torch.testing.assert_close(guide.phase_flipped(once, defocus), images, atol=1e-9,
                               rtol=0)
    # The pose encoder sees flipped images, the defocus encoder the raw ones.
    assert not torch.allclose(guide.encoder_input("rotation", images.float(), defocus),
                              guide.encoder_input("defocus", images.float(), defocus))


def test_parse_latents():
    assert parse_latents("pose,defocus,modes") == ORDER
    assert parse_latents("modes, defocus") == ("defocus", "enm_scale")
    with pytest.raises(ValueError, match="unknown latent"):
        parse_latents("pose,shift")


@pytest.mark.parametrize("shared_trunk", [True, False])
def test_bf16_trunk_keeps_the_densities_within_its_rounding(shared_trunk):
    """Guide.bf16 runs the trunk in bf16 (8-bit mantissa: relative rounding 2^-9 per
    operation) and everything after it in float32: the same weights give log densities
    that differ (the bf16 path ran) by far less than the spread of the densities over
    the batch, in float32."""
    torch.manual_seed(0)
    guide = Guide(tiny_config(shared_trunk=shared_trunk, phase_flip=not shared_trunk))
    with torch.no_grad():  # leave the prior start, so the outputs depend on the image
        for encoder in guide.encoders.values():
            encoder.rest[-1].weight.normal_(0.0, 0.3)
    guide.eval()
    images = torch.randn(64, 16, 16)
    values = {"defocus": 10000 + 2500 * torch.randn(64), "rotation": random_quaternions(64),
              "enm_scale": 2 * torch.randn(64, 1)}
    with torch.no_grad():
        exact = guide.log_prob(images, values)
        guide.bf16 = True
        rounded = guide.log_prob(images, values)
    for site in exact:
        assert rounded[site].dtype == torch.float32
        difference = (rounded[site] - exact[site]).abs().max()
        assert 0 < difference < 0.05 * exact[site].std(), site


def test_precision_choice():
    from cryosvi.errors import CryosviError
    from cryosvi.guide import native_bf16, trunk_bf16

    cpu = torch.device("cpu")
    assert not trunk_bf16("fp32", cpu) and trunk_bf16("bf16", cpu)
    assert trunk_bf16("auto", cpu) == native_bf16(cpu)
    with pytest.raises(CryosviError, match="precision"):
        trunk_bf16("half", cpu)
