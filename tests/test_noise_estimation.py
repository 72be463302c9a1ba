"""cryosvi.noise_data.estimate_noise_model / refine_noise_model on particles made here with a
known noise: cryosvi's forward model (two optics groups, astigmatic CTFs, shifts), a
lognormal contrast per particle, a B = 100 Å^2 envelope, coloured noise of a different
spectrum per group and a noise level per particle, then each image normalised as
``relion_preprocess --norm --no_ramp --bg_radius`` does (checked against
relion_preprocess itself when RELION is installed). The truth after normalisation: a
particle's noise spectrum is (level_i / std_i)^2 S_g, its signal's scale c_i / std_i."""

from __future__ import annotations

import math
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosvi.config import Imaging, Noise, Optics, Priors
from cryosvi.dataset import ParticleData
from cryosvi.noise_data import estimate_noise_model, noise_groups, refine_noise_model
from cryosvi.io.particles import read_particles
from cryosvi.physics import spectrum as sp
from cryosvi.physics.noise import NoiseModel, coloured_noise
from cryosvi.physics.optics import OpticsGroups, ParticleCTF
from cryosvi.physics.rotations import matrix_to_euler, quaternion_to_matrix, random_quaternions
from cryosvi.reference import Reference, build_reference

BOX, PIXEL, N, BG_RADIUS, BFACTOR = 48, 2.5, 1200, 18, 100.0
SPREAD, LEVEL_SPREAD = 0.25, 0.1

pytestmark = pytest.mark.usefixtures("one_thread")



def relion_normalise(images: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """relion_preprocess --norm --no_ramp: the pixels farther than ``radius`` from the
    centre to mean 0 and std 1 (ddof 0), image by image. Returns (images, stds)."""
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    background = images[:, np.hypot(x, y) > radius]
    stds = background.std(1)
    return (images - background.mean(1)[:, None, None]) / stds[:, None, None], stds


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    g = torch.Generator().manual_seed(0)
    optics = Optics(pixel_size=PIXEL, box=BOX)
    reference = build_reference(None, None, 3, optics, Imaging(sigma=2.0),
                                Priors(mode_std=(2.0,)), Noise())
    groups = OpticsGroups((300.0, 200.0), (2.7, 2.0), (0.1, 0.07), (PIXEL, PIXEL))
    forward = reference.forward_model(groups)
    group = torch.randint(2, (N,), generator=g)
    u = 8000 + 12000 * torch.rand(N, generator=g)
    ctf = ParticleCTF(u, u - 800 * torch.rand(N, generator=g), 180 * torch.rand(N, generator=g),
                      group=group)
    shifts = 8 * torch.rand(N, 2, generator=g) - 4
    rotation = random_quaternions(N, g)
    modes = 2.0 * torch.randn(N, 1, generator=g)
    with torch.no_grad():
        clean = forward(modes, rotation, None, ctf=ctf, shifts=shifts).double()
    contrast = torch.exp(SPREAD * torch.randn(N, generator=g, dtype=torch.float64)
                         - SPREAD**2 / 2)
    signal = contrast[:, None, None] * sp.apply_envelope(clean, PIXEL, BFACTOR)
    shapes = torch.stack([sp.coloured_spectrum(BOX, 3.0, 0.05, 0.4),
                          sp.coloured_spectrum(BOX, 2.0, 0.08, 0.25)])
    level = torch.exp(LEVEL_SPREAD * torch.randn(N, generator=g, dtype=torch.float64))
    noise_std = math.sqrt(float(signal.var()) / 0.3)  # SNR 0.3
    noise = coloured_noise(shapes[group], BOX, g) * (noise_std * level)[:, None, None]
    raw = (signal + noise + 7.0).numpy().astype(np.float32)  # an offset, as a camera's
    images, stds = relion_normalise(raw.astype(np.float64), BG_RADIUS)
    write = {"raw.mrcs": raw, "particles.mrcs": images.astype(np.float32)}
    for name, stack in write.items():
        with mrcfile.new(root / name, overwrite=True) as mrc:
            mrc.set_data(stack)
            mrc.set_image_stack()
            mrc.voxel_size = PIXEL
    rot, tilt, psi = (a.numpy() for a in matrix_to_euler(quaternion_to_matrix(
        rotation.double())))
    table = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(N)],
        "rlnDefocusU": ctf.defocus_u.numpy(), "rlnDefocusV": ctf.defocus_v.numpy(),
        "rlnDefocusAngle": ctf.angle.numpy(), "rlnAngleRot": rot, "rlnAngleTilt": tilt,
        "rlnAnglePsi": psi, "rlnOriginXAngst": shifts[:, 0].numpy(),
        "rlnOriginYAngst": shifts[:, 1].numpy(), "rlnOpticsGroup": group.numpy() + 1})
    optics_table = pd.DataFrame({
        "rlnOpticsGroupName": ["one", "two"], "rlnOpticsGroup": [1, 2],
        "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 2.0],
        "rlnAmplitudeContrast": [0.1, 0.07], "rlnImagePixelSize": [PIXEL, PIXEL],
        "rlnImageSize": [BOX, BOX], "rlnImageDimensionality": [2, 2]})
    starfile.write({"optics": optics_table, "particles": table}, root / "particles.star",
                   overwrite=True)
    scale = (noise_std * level / torch.from_numpy(stds)) ** 2
    truth = torch.stack([(scale[group == k].mean()) * shapes[k] for k in range(2)])
    return {"root": root, "reference": reference, "forward": forward, "clean": clean,
            "truth": truth, "signal_scale": contrast / torch.from_numpy(stds),
            "modes": modes, "rotation": rotation, "ctf": ctf, "shifts": shifts}


def particle_data(made, box=BOX) -> ParticleData:
    return ParticleData(read_particles(made["root"] / "particles.star"), box, True)


@pytest.fixture(scope="module")
def first(made):
    return estimate_noise_model(particle_data(made), made["reference"], seed=1)


def test_estimate_from_the_particles_alone(made, first):
    """No poses: every shell up to Nyquist within 10 % of the true spectrum of the
    normalised images (signal-corrected background), the contrast's mean within 15 % of
    the particles' mean signal scale (second moments, the B envelope unknown to the
    model images), tau 0, P positive where the signal is."""
    data, noise = particle_data(made), first
    assert noise.n_groups == 2 and not noise.cropped and noise.box == BOX
    error = (noise.noise / made["truth"] - 1)[:, 1:BOX // 2 + 1].abs()
    assert float(error.max()) < 0.1, error.max(1)
    assert abs(noise.contrast_mean / float(made["signal_scale"].mean()) - 1) < 0.15
    assert noise.contrast_std == 0
    assert float(noise.signal_power[:, 1:6].min()) > 0
    group, n_groups = noise_groups(data)
    assert n_groups == 2 and torch.equal(group, torch.from_numpy(
        data.particles.metadata["rlnOpticsGroup"].to_numpy() - 1))


def test_refine_at_the_true_latents(made, first):
    """Model images at the true latents: B within 10 Å^2 of 100, every shell's noise
    within 5 % of the truth, the model-error spectrum small (the model is exact up to the
    envelope), the contrast prior's mean and std within 5 % and 15 % of the particles'
    signal scale, the floor at mu - 2 tau."""
    data = particle_data(made)
    rows = np.arange(N)
    out = refine_noise_model(first, data, made["reference"], rows, made["clean"])
    noise = out.noise
    assert abs(noise.bfactor - BFACTOR) < 10 and out.bfactor_shells >= 8
    error = (noise.noise / made["truth"] - 1)[:, 1:].abs()
    assert float(error[:, :BOX // 2].max()) < 0.05, error.max(1)
    assert float((noise.error / made["truth"])[:, 1:BOX // 2].max()) < 0.05
    truth = made["signal_scale"]
    assert abs(noise.contrast_mean / float(truth.mean()) - 1) < 0.05
    assert abs(noise.contrast_std / float(truth.std()) - 1) < 0.15
    assert noise.contrast_floor == pytest.approx(noise.contrast_mean
                                                 - 2 * noise.contrast_std)
    assert np.corrcoef(out.contrast.numpy(), truth.numpy())[0, 1] > 0.8
    # Junk weighted out changes nothing: the same particles twice, the copies at weight 0
    # with their model images replaced by noise.
    twice = np.concatenate([rows[:400], rows[:400]])
    fake = torch.cat([made["clean"][:400], torch.randn(400, BOX, BOX, dtype=torch.float64)])
    weights = torch.cat([torch.ones(400), torch.zeros(400)])
    weighted = refine_noise_model(first, data, made["reference"], twice, fake, weights)
    alone = refine_noise_model(first, data, made["reference"], rows[:400], made["clean"][:400])
    assert weighted.noise.bfactor == pytest.approx(alone.noise.bfactor, rel=1e-9)
    assert torch.allclose(weighted.noise.noise, alone.noise.noise, rtol=1e-9)


def test_refine_at_a_cropped_working_box(made):
    """The particles Fourier-cropped to 32 px: the model is 'cropped', and the noise
    refined against model images rendered at the working box matches the truth cropped
    (NoiseModel.at_box) within 6 % per shell."""
    small = 32
    data = particle_data(made, small)
    reference = made["reference"].at_box(small, PIXEL * BOX / small)
    first = estimate_noise_model(data, reference, seed=2)
    assert first.cropped and first.pixel_size == pytest.approx(PIXEL * BOX / small)
    forward = reference.forward_model(OpticsGroups((300.0, 200.0), (2.7, 2.0), (0.1, 0.07),
                                                   (first.pixel_size,) * 2))
    with torch.no_grad():
        clean = forward(made["modes"], made["rotation"], None, ctf=made["ctf"],
                        shifts=made["shifts"])
    out = refine_noise_model(first, data, reference, np.arange(N), clean)
    truth = NoiseModel(BOX, PIXEL, made["truth"]).at_box(small).noise
    error = (out.noise.noise / truth - 1)[:, 1:small // 2].abs()
    assert float(error.max()) < 0.06, error.max(1)


def test_noise_model_travels_in_reference_npz(made, tmp_path):
    noise = NoiseModel(BOX, PIXEL, made["truth"], error=0.1 * made["truth"],
                       contrast_std=0.2, contrast_floor=0.6, bfactor=80.0, level_std=0.15,
                       origin="test")
    reference = made["reference"].with_settings(noise_model=noise)
    reference.save(tmp_path / "reference.npz")
    loaded = Reference.load(tmp_path / "reference.npz").noise_model
    assert torch.equal(loaded.noise, noise.noise) and torch.equal(loaded.error, noise.error)
    assert (loaded.contrast_std, loaded.contrast_floor, loaded.bfactor, loaded.level_std,
            loaded.origin) == (0.2, 0.6, 80.0, 0.15, "test")
    cropped = reference.at_box(32, PIXEL * BOX / 32).noise_model
    assert cropped.box == 32 and cropped.cropped
    # a damaged spectrum is one CryosviError naming the file
    with np.load(tmp_path / "reference.npz") as data:
        arrays = dict(data)
    arrays["noise_model_noise"] = -arrays["noise_model_noise"]
    np.savez(tmp_path / "bad.npz", **arrays)
    from cryosvi.errors import CryosviError
    with pytest.raises(CryosviError, match="bad.npz.*noise spectrum"):
        Reference.load(tmp_path / "bad.npz")
    assert Reference.load(tmp_path / "reference.npz").noise_model is not None
    made["reference"].save(tmp_path / "plain.npz")
    assert Reference.load(tmp_path / "plain.npz").noise_model is None


@pytest.mark.skipif(shutil.which("relion_preprocess") is None,
                    reason="RELION's relion_preprocess is not installed")
def test_normalisation_is_relion_preprocess(made, tmp_path):
    """relion_preprocess --norm --no_ramp on the raw stack gives the stack the estimates
    above were made from (float32 rounding)."""
    command = ["relion_preprocess", "--operate_on", str(made["root"] / "raw.mrcs"), "--norm",
               "--no_ramp", "--bg_radius", str(BG_RADIUS), "--operate_out",
               str(tmp_path / "relion.mrcs")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    relion = mrcfile.read(tmp_path / "relion.mrcs")
    ours = mrcfile.read(made["root"] / "particles.mrcs")
    assert np.abs(relion - ours).max() < 1e-4


def test_noise_levels_from_the_background(made, first, tmp_path):
    """Each particle's noise level from its background against the group's spectrum
    (``spectrum.background_levels``): the raw images, whose noise std varies as a
    lognormal of log-std 0.1 (log lambda^2 std 0.2), give a level spread within 25 % of
    0.2; RELION-normalised (each image by its own background) leave ~0."""
    assert first.level_std < 0.05
    text = (made["root"] / "particles.star").read_text().replace("@particles.mrcs",
                                                                  "@raw.mrcs")
    (made["root"] / "raw.star").write_text(text)
    raw = ParticleData(read_particles(made["root"] / "raw.star"), BOX, True)
    noise = estimate_noise_model(raw, made["reference"], seed=1)
    assert noise.level_std == pytest.approx(2 * LEVEL_SPREAD, rel=0.25)


def test_a_subset_of_the_optics_groups_gets_its_own_groups_spectra(made, first, tmp_path):
    """The estimate records each row's rlnOpticsGroup, and the particles of group 2 alone
    get group 2's spectra (by number, not by order); a group it never saw is refused in
    one line; the numbers travel in the reference file."""
    from cryosvi.errors import CryosviError
    from cryosvi.noise_data import matched_noise_model

    assert first.groups == (1, 2)
    tables = starfile.read(made["root"] / "particles.star", always_dict=True)
    particles = tables["particles"]
    for group, name in ((2, "two.star"), (3, "three.star")):
        subset = particles[particles["rlnOpticsGroup"] == 2].copy()
        subset["rlnOpticsGroup"] = group
        optics = tables["optics"].copy()
        optics.loc[optics["rlnOpticsGroup"] == 2, "rlnOpticsGroup"] = group
        starfile.write({"optics": optics, "particles": subset}, made["root"] / name,
                       overwrite=True)
    reference = made["reference"].with_settings(noise_model=first)
    reference.save(tmp_path / "reference.npz")
    reference = Reference.load(tmp_path / "reference.npz")
    assert reference.noise_model.groups == (1, 2)
    two = ParticleData(read_particles(made["root"] / "two.star"), BOX, True)
    matched = matched_noise_model(two, reference).noise_model
    assert matched.groups == (2,) and torch.equal(matched.noise, first.noise[1:])
    three = ParticleData(read_particles(made["root"] / "three.star"), BOX, True)
    with pytest.raises(CryosviError, match="optics group 3 .*no noise spectrum.*1, 2"):
        matched_noise_model(three, reference)
