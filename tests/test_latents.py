"""The latent registry: one definition per latent, walked by the model, the guide, the
SMC moves, summaries and the STAR columns."""

import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine

from cryosvi.config import Priors
from cryosvi.physics.optics import ParticleCTF
from cryosvi.guide import Guide
from cryosvi.latents import (BY_NAME, ORDER, PAPER_SITES, REGISTRY, known_values,
                             model_sites, parse_latents, random_walks)
from cryosvi.physics.conditions import Conditions
from cryosvi.model import SITES, model
from cryosvi.physics.rotations import quaternion_geodesic_angle, random_quaternions

from test_guide import tiny_config, tiny_reference

ALL = ("defocus", "shifts", "rotation", "enm_scale")


def test_registry_names_and_orders():
    assert ORDER == ALL
    assert PAPER_SITES == ("defocus", "rotation", "enm_scale")
    assert SITES == ("enm_scale", "rotation", "defocus")  # the model's draw order
    assert set(BY_NAME) == {"defocus", "shifts", "pose", "modes"}
    assert parse_latents("modes,shifts,pose") == ("shifts", "rotation", "enm_scale")
    assert [latent.site for latent in model_sites(("shifts",))] == [
        "enm_scale", "rotation", "defocus", "shifts"]
    assert list(random_walks(ALL, tiny_config())) == ["rotation", "defocus", "enm_scale",
                                                      "shifts"]
    for latent in REGISTRY.values():  # every summary key distinct
        assert latent.mean_key != latent.std_key
    keys = [k for latent in REGISTRY.values() for k in (latent.mean_key, latent.std_key)]
    assert len(set(keys)) == len(keys)


def test_untrained_shift_head_is_the_prior_around_the_file_value():
    guide = Guide(tiny_config(latents=ALL, shift_std=3.0))
    shifts = torch.tensor([[1.0, -2.0], [0.0, 4.5], [-3.0, 0.5]])
    _, _, dists = guide.sample(torch.randn(3, 16, 16), n_samples=2,
                               conditions=Conditions(shifts=shifts))
    torch.testing.assert_close(dists["shifts"].mean, shifts.expand(2, 3, 2))
    torch.testing.assert_close(dists["shifts"].stddev, torch.full((2, 3, 2), 3.0),
                               rtol=1e-5, atol=1e-5)


def test_shift_site_only_when_inferred_and_its_prior():
    reference = tiny_reference()
    forward = reference.forward_model()
    priors = Priors(shift_std=1.5)
    file_shifts = torch.tensor([3.0, -1.0]).expand(4000, 2)
    pyro.set_rng_seed(0)
    trace = poutine.trace(model).get_trace(forward, priors, 0.0, batch_size=4000,
                                           conditions=Conditions(shifts=file_shifts),
                                           latents=ALL)
    draws = trace.nodes["shifts"]["value"]
    tolerance = 4 * 1.5 / math.sqrt(4000)
    np.testing.assert_allclose(draws.mean(0).numpy(), [3.0, -1.0], atol=tolerance)
    np.testing.assert_allclose(draws.std(0).numpy(), [1.5, 1.5], rtol=0.05)
    plain = poutine.trace(model).get_trace(forward, priors, 0.0, batch_size=4)
    assert "shifts" not in plain.nodes


def test_defocus_is_an_offset_with_ctf_estimates():
    reference = tiny_reference()
    forward = reference.forward_model()
    priors = Priors(defocus_offset_std=400.0)
    n = 4000
    ctf = ParticleCTF(torch.full((n,), 12000.0), torch.full((n,), 11000.0),
                      torch.full((n,), 30.0))
    pyro.set_rng_seed(1)
    trace = poutine.trace(model).get_trace(forward, priors, 0.0, batch_size=n,
                                           conditions=Conditions(ctf=ctf))
    dz = trace.nodes["defocus"]["value"]
    assert abs(float(dz.mean())) < 4 * 400 / math.sqrt(n)
    assert float(dz.std()) == pytest.approx(400.0, rel=0.05)


def test_guide_and_model_sites_match_with_shifts():
    torch.manual_seed(0)
    reference = tiny_reference()
    guide = Guide(tiny_config(latents=ALL))
    images = torch.randn(5, 16, 16)
    conditions = Conditions(shifts=torch.randn(5, 2))
    forward = reference.forward_model()
    guide_trace = poutine.trace(guide.pyro_guide()).get_trace(
        forward, reference.priors, 0.1, images=images, conditions=conditions, latents=ALL)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        forward, reference.priors, 0.1, images=images, conditions=conditions, latents=ALL)
    for site in ALL:
        assert guide_trace.nodes[site]["value"].shape == model_trace.nodes[site]["value"].shape
    assert guide_trace.nodes["shifts"]["value"].shape == (5, 2)
    model_trace.compute_log_prob()
    assert torch.isfinite(model_trace.nodes["shifts"]["log_prob"]).all()


class Table:
    """What ``known`` reads of a ParticleSet."""

    def __init__(self, frame):
        self.metadata, self.path = frame, "table.star"

    def __len__(self):
        return len(self.metadata)

    def require(self, *columns):
        assert all(c in self.metadata for c in columns)

    def has(self, *columns):
        return all(c in self.metadata for c in columns)

    def column(self, name, rows=None):
        values = self.metadata[name].to_numpy()
        return values if rows is None else values[rows]


def test_known_values_and_output_columns_round_trip():
    q = random_quaternions(6, generator=torch.Generator().manual_seed(3)).double()
    pose = REGISTRY["rotation"]
    frame = pd.DataFrame(pose.value_columns(q, None, None))
    frame["rlnDefocusU"], frame["rlnDefocusV"] = 11000.0, 9000.0
    frame["rlnDefocusAngle"] = 20.0
    frame["rlnOriginXAngst"], frame["rlnOriginYAngst"] = 1.5, -2.5
    frame["cryosviModeAmplitude1"] = np.arange(6.0)
    config = tiny_config()
    known = known_values(Table(frame), ALL, config)
    assert quaternion_geodesic_angle(known["rotation"].double(), q).max() < 1e-3
    torch.testing.assert_close(known["defocus"], torch.full((6,), 10000.0))
    torch.testing.assert_close(known["shifts"], torch.tensor([[1.5, -2.5]]).expand(6, 2))
    torch.testing.assert_close(known["enm_scale"][:, 0], torch.arange(6.0))
    # An offset: the estimate as it is (dz = 0), output U + dz, V + dz, angle kept.
    offset = tiny_config(ctf_estimates=True, defocus_mean=0.0, defocus_std=500.0)
    assert (known_values(Table(frame), ["defocus"], offset)["defocus"] == 0).all()
    columns = REGISTRY["defocus"].value_columns(torch.full((6,), 100.0), frame, offset)
    np.testing.assert_allclose(columns["rlnDefocusU"], 11100.0)
    np.testing.assert_allclose(columns["rlnDefocusV"], 9100.0)
    np.testing.assert_allclose(columns["rlnDefocusAngle"], 20.0)
    # A defocus m keeps the astigmatism around it.
    columns = REGISTRY["defocus"].value_columns(torch.full((6,), 8000.0), frame, config)
    np.testing.assert_allclose(columns["rlnDefocusU"], 9000.0)
    np.testing.assert_allclose(columns["rlnDefocusV"], 7000.0)


# --------------------------------------------------------------- real image formation
def test_known_shifts_translate_the_image_by_relions_sign():
    """Origin (x, y) = (2, -3) px: the particle's centre moves to (L//2 + 3, L//2 - 2)
    (RELION translates the centred projection by -origin)."""
    from cryosvi.latents import forward_inputs

    reference = tiny_reference()
    forward = reference.forward_model()
    pixel = reference.optics.pixel_size
    values = {"enm_scale": torch.zeros(1, 1), "rotation": torch.tensor([[1.0, 0, 0, 0]]),
              "defocus": torch.full((1,), 10000.0)}
    shifts = torch.tensor([[2 * pixel, -3 * pixel]])
    centred = forward(**forward_inputs(values, Conditions()))
    moved = forward(**forward_inputs(values, Conditions(shifts=shifts)))
    expected = torch.roll(centred, shifts=(3, -2), dims=(-2, -1))
    inner = (slice(None), slice(4, 12), slice(4, 12))  # away from what left the box
    torch.testing.assert_close(moved[inner], expected[inner], atol=1e-4, rtol=0)


def test_gray_levels_recovered_from_the_particles(tmp_path):
    """Particles a * image + b (noise a * s): the run's scale, offset and noise std."""
    from dataclasses import replace

    from cryosvi.dataset import ParticleData
    from cryosvi.simulate import simulate_dataset
    from cryosvi.training.setup import TrainOptions, prepare
    from cryosvi.dataset import estimate_levels
    from cryosvi.io.particles import read_particles

    reference = tiny_reference(snr=2.0, box=32)
    made = simulate_dataset(reference, 600, tmp_path / "data", seed=0)
    table = read_particles(tmp_path / "data" / "particles.star")
    data = ParticleData(table, 32, False)
    a, b = 7.0, -3.0
    data.images = (lambda original: lambda rows: a * original(rows) + b)(data.images)
    levels = estimate_levels(data, made, seed=0, device="cpu")
    assert levels.scale == pytest.approx(a, rel=0.05)
    assert levels.offset == pytest.approx(b, abs=0.05 * a * made.noise.std)
    assert levels.noise_std == pytest.approx(a * made.noise.std, rel=0.05)
    # prepare() estimates them when no noise std is known, and the model uses them.
    unknown = made.with_settings(noise=replace(made.noise, std=0.0))
    _, _, prepared, config, _ = prepare(tmp_path / "data" / "particles.star", unknown,
                                        TrainOptions())
    assert prepared.imaging.scale == pytest.approx(1.0, rel=0.05)
    assert prepared.noise.std == pytest.approx(made.noise.std, rel=0.05)
    assert not config.ctf_estimates  # a paper-model simulation's defocus is a latent


def test_working_box_crops_the_particles(tmp_path):
    from cryosvi.simulate import simulate_dataset
    from cryosvi.training.setup import TrainOptions, prepare

    reference = tiny_reference(box=32)
    simulate_dataset(reference, 20, tmp_path / "data", seed=0)
    made = __import__("cryosvi.reference", fromlist=["Reference"]).Reference.load(
        tmp_path / "data" / "reference.npz")
    table, data, working, config, _ = prepare(tmp_path / "data" / "particles.star", made,
                                              TrainOptions(box=16))
    assert config.box == working.optics.box == 16
    assert working.optics.pixel_size == pytest.approx(2 * reference.optics.pixel_size)
    images = data.images(np.arange(3))
    assert images.shape == (3, 16, 16) and images.dtype == np.float32
    full = table.images(np.arange(3)).astype(np.float64)
    # Gray levels kept: the mean of each image survives the crop.
    np.testing.assert_allclose(images.mean((1, 2)), full.mean((1, 2)), atol=1e-5)


class Sized:
    """The metadata a data box is read from."""

    def __init__(self, box):
        self.metadata = pd.DataFrame({"rlnImageSize": [box, box]})
        self.path = "p.star"

    def ensure_image_size(self):
        pass

    def column(self, name):
        return self.metadata[name].to_numpy()


@pytest.mark.parametrize("data_box", [256, 400])
def test_default_guide_stays_small_at_any_data_box(data_box):
    from cryosvi.dataset import working_box
    from cryosvi.guide import GuideConfig

    box = working_box(Sized(data_box))
    assert box == 64
    config = GuideConfig(box=box, n_modes=1, latents=ALL, ctf_estimates=True)
    # 4.63 M (under 5 M); at the data box it would be 70 M+
    assert Guide(config).parameter_count() < 5_000_000


def test_multi_group_simulation_round_trips_through_read_particles(tmp_path):
    from cryosvi.dataset import known_shifts, optics_groups, particle_ctf
    from cryosvi.io.particles import read_particles
    from cryosvi.simulate import Acquisition, group_optics, simulate_dataset

    reference = tiny_reference()
    groups = group_optics(reference.optics, 2)
    made = simulate_dataset(reference, 40, tmp_path / "data", seed=1, acquisition=Acquisition(
        max_shift=5.0, astigmatism=600.0, groups=groups))
    assert made.source["ctf_estimates"]
    table = read_particles(tmp_path / "data" / "particles.star")
    read = optics_groups(table)
    assert read.voltage == (300.0, 200.0) and read.spherical_aberration == (2.7, 2.0)
    ctf = particle_ctf(table)
    assert set(ctf.group.tolist()) == {0, 1}
    assert float((ctf.defocus_u - ctf.defocus_v).abs().max()) <= 600.0 + 1e-3
    assert float((ctf.defocus_u - ctf.defocus_v).abs().max()) > 0
    shifts = known_shifts(table)
    assert float(shifts.abs().max()) <= 5.0 and float(shifts.abs().min()) >= 0
    assert float(shifts.abs().max()) > 1.0
    images = table.images(np.arange(40))
    assert np.isfinite(images).all() and images.shape == (40, 16, 16)
