"""benchmarks/realistic/make_dataset.py: a RELION-projected all-atom data set.

The references are independent of the script: the RELION 3.1 STAR layout (optics +
particles blocks, ``N@stack.mrcs`` image names), the MRC header, and for the images a
projection computed here from the written maps: the map rotated in real space by the
true Euler angles (cryosvi's reading of RELION's ``Euler_angles2matrix``: the particle
shows the density at A r), summed along z, multiplied by the CTF written out from
RELION's ``CTF::getCTF`` (src/ctf.h) and translated by -origin (RELION's
``shiftImageInFourierTransform(-xoff, -yoff)`` in src/apps/project.cpp).
Skipped when RELION's ``relion_project`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import scipy.ndimage
import starfile
import torch

from cryosvi.physics.rotations import euler_to_matrix, geodesic_angle

pytestmark = pytest.mark.skipif(shutil.which("relion_project") is None,
                                reason="RELION's relion_project is not installed")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "realistic" / "make_dataset.py"
N, BINS, BOX, PIXEL, MAX_SHIFT, SNR = 16, 3, 48, 2.0, 6.0, 2.0


def _load_script():
    spec = importlib.util.spec_from_file_location("make_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    output = tmp_path_factory.mktemp("realistic")
    _load_script().main(["-o", str(output), "--n", str(N), "--bins", str(BINS),
                         "--snr", str(SNR), "--oracle", "4", "--save-clean", "--seed", "3"])
    star = starfile.read(output / "particles.star", always_dict=True)
    truth = json.loads((output / "truth.json").read_text())
    return output, star, truth


def test_star_is_relion_31_with_two_optics_groups_and_truth(dataset):
    output, star, truth = dataset
    assert set(star) == {"optics", "particles"}
    optics, particles = star["optics"], star["particles"]
    assert sorted(optics["rlnOpticsGroup"]) == [1, 2]
    assert sorted(optics["rlnVoltage"]) == [200.0, 300.0]
    assert (optics["rlnImagePixelSize"] == PIXEL).all() and (optics["rlnImageSize"] == BOX).all()
    assert len(particles) == N
    assert set(particles["rlnOpticsGroup"]) <= {1, 2}
    names = particles["rlnImageName"].str.split("@", expand=True)
    assert names[0].astype(int).tolist() == list(range(1, N + 1))
    assert (names[1] == "particles.mrcs").all()
    for column in ["cryosviTrueAngleRot", "cryosviTrueAngleTilt", "cryosviTrueAnglePsi",
                   "cryosviTrueDefocusU", "cryosviTrueDefocusV", "cryosviTrueDefocusAngle",
                   "cryosviTrueOriginXAngst", "cryosviTrueOriginYAngst",
                   "cryosviTrueOpticsGroup", "cryosviTrueConformation"]:
        assert column in particles
    for axis in "XY":
        shifts = particles[f"rlnOrigin{axis}Angst"]
        assert (shifts.abs() <= MAX_SHIFT).all()
        assert np.allclose(shifts, particles[f"cryosviTrueOrigin{axis}Angst"], atol=1e-5)
    assert set(particles["cryosviTrueConformation"]) <= set(
        truth["conformation"]["bin_angles_deg"])
    # The consensus poses are the truth rotated by a few degrees, as recorded.
    given = euler_to_matrix(*(torch.tensor(particles[f"rlnAngle{a}"].to_numpy())
                              for a in ("Rot", "Tilt", "Psi")))
    true = euler_to_matrix(*(torch.tensor(particles[f"cryosviTrueAngle{a}"].to_numpy())
                             for a in ("Rot", "Tilt", "Psi")))
    error = geodesic_angle(given, true).numpy()
    assert np.allclose(error, particles["cryosviPoseError"], atol=1e-3)
    assert 0 < error.max() < 10
    # truth.star: the same truth under RELION's labels, row for row.
    truth_star = starfile.read(output / "truth.star", always_dict=True)["particles"]
    assert (truth_star["rlnImageName"] == particles["rlnImageName"]).all()
    for label in ("AngleRot", "AngleTilt", "AnglePsi", "DefocusU", "DefocusV"):
        assert np.allclose(truth_star[f"rln{label}"], particles[f"cryosviTrue{label}"],
                           atol=1e-5)


def test_stack_and_normalisation(dataset):
    output, star, truth = dataset
    with mrcfile.open(output / "particles.mrcs") as mrc:
        images = mrc.data.copy()
        assert images.shape == (N, BOX, BOX) and images.dtype == np.float32
        assert np.isclose(float(mrc.voxel_size.x), PIXEL)
        assert mrc.is_image_stack()
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    background = images[:, np.hypot(x, y) > 0.75 * BOX / 2]
    assert np.allclose(background.mean(1), 0, atol=1e-4)
    assert np.allclose(background.std(1), 1, atol=1e-4)
    # The noise: the normalised image minus the clean image put through the same
    # normalisation is white noise of the recorded std, at the requested SNR.
    particles = star["particles"]
    clean = mrcfile.read(output / "clean.mrcs")
    noise_std = truth["noise_std_before_normalisation"]
    assert np.isclose(clean.astype(np.float64).var() / noise_std**2, SNR, rtol=1e-6)
    scaled = ((clean - particles["cryosviNormMean"].to_numpy()[:, None, None])
              / particles["cryosviNormStd"].to_numpy()[:, None, None])
    residual_std = (images - scaled).reshape(N, -1).std(1)
    assert np.allclose(residual_std, particles["cryosviNoiseStd"], rtol=0.06)


def _relion_ctf(shape_rfft, optics_row, u, v, angle):
    """RELION's CTF::getCTF (src/ctf.h) on the rfft2 grid of a BOX x BOX image."""
    volts = optics_row["rlnVoltage"] * 1e3
    wavelength = 12.2643247 / np.sqrt(volts * (1 + volts * 0.978466e-6))
    fy = np.fft.fftfreq(BOX, d=PIXEL)[:, None]
    fx = np.fft.rfftfreq(BOX, d=PIXEL)[None, :]
    u2 = fx**2 + fy**2
    deltaf = -(u + v) / 2 - (u - v) / 2 * np.cos(2 * (np.arctan2(fy, fx) - np.radians(angle)))
    q0 = optics_row["rlnAmplitudeContrast"]
    argument = (np.pi * wavelength * deltaf * u2
                + np.pi / 2 * optics_row["rlnSphericalAberration"] * 1e7 * wavelength**3 * u2**2
                - np.arctan(q0 / np.sqrt(1 - q0**2)))
    ctf = -np.sin(argument)
    assert ctf.shape == shape_rfft
    return ctf


def _reference_image(volume, particle, optics_row, transpose=False):
    """Real-space projection of ``volume`` [z, y, x] for the particle's true pose, CTF and
    shift (see the module notes). ``transpose`` uses A^T instead of A (a wrong reading)."""
    matrix = euler_to_matrix(*(torch.tensor(particle[f"cryosviTrueAngle{a}"])
                               for a in ("Rot", "Tilt", "Psi"))).numpy()
    matrix = matrix.T if transpose else matrix
    centre = BOX // 2
    grid = np.arange(BOX) - centre
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    # The image at p = (x, y, z) shows the density at A^T p (row vectors: p @ A).
    source = np.stack([x, y, z], -1) @ matrix + centre
    sampled = scipy.ndimage.map_coordinates(volume, source[..., ::-1].reshape(-1, 3).T,
                                            order=3, mode="constant")
    spectrum = np.fft.rfft2(sampled.reshape(BOX, BOX, BOX).sum(0))
    spectrum *= _relion_ctf(spectrum.shape, optics_row, particle["cryosviTrueDefocusU"],
                            particle["cryosviTrueDefocusV"],
                            particle["cryosviTrueDefocusAngle"])
    ky = 2 * np.pi * np.fft.fftfreq(BOX)[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(BOX)[None, :]
    shift_x = particle["cryosviTrueOriginXAngst"] / PIXEL
    shift_y = particle["cryosviTrueOriginYAngst"] / PIXEL
    spectrum *= np.exp(1j * (kx * shift_x + ky * shift_y))        # translation by -origin
    spectrum[np.hypot(ky, kx) * BOX / (2 * np.pi) > BOX // 2] = 0  # RELION's r_max
    return np.fft.irfft2(spectrum, s=(BOX, BOX))


def test_clean_images_match_an_independent_projection(dataset):
    output, star, _ = dataset
    optics = star["optics"].set_index("rlnOpticsGroup")
    clean = mrcfile.read(output / "clean.mrcs")
    maps = sorted((output / "maps").glob("conformation_*.mrc"))
    assert len(maps) == BINS
    correlations, wrong = [], []
    for index, particle in star["particles"].iterrows():
        volume = mrcfile.read(maps[int(particle["cryosviConformationBin"])])
        row = optics.loc[int(particle["cryosviTrueOpticsGroup"])]
        image = clean[index].ravel()
        correlations.append(np.corrcoef(_reference_image(volume, particle, row).ravel(),
                                        image)[0, 1])
        wrong.append(np.corrcoef(_reference_image(volume, particle, row, transpose=True)
                                 .ravel(), image)[0, 1])
    assert min(correlations) > 0.995, correlations
    assert max(wrong) < 0.9, wrong


def test_maps_centred_and_hinge_recorded(dataset):
    output, _, truth = dataset
    with mrcfile.open(output / "maps" / "conformation_000.mrc") as mrc:
        assert mrc.data.shape == (BOX, BOX, BOX)
        assert np.isclose(float(mrc.voxel_size.x), PIXEL)
        reference = mrc.data.copy()
    weights = np.clip(reference, 0, None)
    centre = [(np.arange(BOX)[:, None, None].swapaxes(0, axis) * weights).sum() / weights.sum()
              for axis in range(3)]
    assert np.allclose(centre, BOX // 2, atol=0.25)
    # A rigid rotation about an axis normal to the lobes' plane opens the cleft angle by
    # exactly the hinge angle.
    angles = np.array(truth["conformation"]["bin_angles_deg"])
    cleft = np.array(truth["conformation"]["cleft_angle_deg"])
    assert np.allclose(cleft - cleft[0], angles, atol=1e-6)
    last = mrcfile.read(output / "maps" / f"conformation_{BINS - 1:03d}.mrc")
    assert np.abs(last - reference).max() > 0.1 * reference.max()
    assert truth["relion_shift_check"]["sign"] == -1


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    output = tmp_path_factory.mktemp("micrograph_effects")
    _load_script().main(["-o", str(output), "--n", "60", "--bins", str(BINS), "--snr", "0.5",
                         "--oracle", "0", "--save-clean", "--seed", "4", "--realistic",
                         "--junk-fraction", "0.3"])
    star = starfile.read(output / "particles.star", always_dict=True)["particles"]
    return output, star, json.loads((output / "truth.json").read_text())


def test_micrograph_effects_are_what_truth_json_says(realistic):
    """--realistic: the noise (normalised image minus the normalised signal) times each
    image's normalisation over its noise level is the recorded coloured spectrum of its
    optics group (whitened by it: flat to 15 % per shell, from numpy's FFT), with excess
    power at low frequency; empty junk has no signal; the truth columns are there."""
    output, particles, truth = realistic
    assert truth["noise"]["spectrum"] == "coloured" and truth["bfactor"] == 100.0
    images = mrcfile.read(output / "particles.mrcs").astype(np.float64)
    signal = mrcfile.read(output / "clean.mrcs").astype(np.float64)
    mean = particles["cryosviNormMean"].to_numpy()[:, None, None]
    std = particles["cryosviNormStd"].to_numpy()[:, None, None]
    noise = (images - (signal - mean) / std) / particles["cryosviNoiseStd"].to_numpy()[:, None,
                                                                                        None]
    k = np.fft.fftfreq(BOX, 1 / BOX)
    shell = np.round(np.hypot(k[:, None], k[None, :])).astype(int)
    power = np.abs(np.fft.fft2(noise)) ** 2 / BOX**2
    group = particles["rlnOpticsGroup"].to_numpy()
    for g in (1, 2):
        spectrum = np.array(truth["noise"]["shells"][str(g)])
        whitened = power[group == g] / spectrum[shell]
        per_shell = np.bincount(shell.ravel(), whitened.mean(0).ravel()) / np.bincount(
            shell.ravel())
        assert np.abs(per_shell[2:BOX // 2] - 1).max() < 0.15, per_shell
        assert spectrum[1] > 2 * spectrum[BOX // 4] > 2 * spectrum[BOX // 2]
    kind = particles["cryosviTrueJunkKind"].to_numpy()
    assert (kind == 1).any() and (kind == 2).any() and (kind == 0).sum() > 30
    assert np.abs(signal[kind == 1]).max() == 0 and np.abs(signal[kind == 2]).max() > 0
    assert (particles["cryosviTrueJunk"] == (kind > 0)).all()
    assert truth["junk"]["empty"] == (kind == 1).sum()
    contrast = particles["cryosviTrueContrast"].to_numpy()
    assert 0.1 < np.log(contrast).std() < 0.4
    np.testing.assert_allclose(particles["cryosviTrueSignalScale"], contrast / std[:, 0, 0],
                               rtol=1e-5)
    truth_star = starfile.read(output / "truth.star", always_dict=True)["particles"]
    assert (truth_star["cryosviTrueJunk"] == particles["cryosviTrueJunk"]).all()


# ------------------------------------------------- cryosvi analyze against the truth
ANALYZE_N, ANALYZE_BINS, ANALYZE_SNR = 150, 9, 2.0


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A realistic set with the hinge (150 particles, 9 conformations 0..30 deg, SNR 2,
    consensus poses given) through learn-modes, train (--latents modes, 2 epochs),
    infer (--refine laplace) and analyze --bins 3 --reconstruct."""
    from cryosvi.cli.main import main

    root = tmp_path_factory.mktemp("analysed")
    data = root / "data"
    _load_script().main(["-o", str(data), "--n", str(ANALYZE_N), "--bins", str(ANALYZE_BINS),
                         "--snr", str(ANALYZE_SNR), "--oracle", "0", "--seed", "5"])
    particles = str(data / "particles.star")
    structure = ["--stride", "2", "--beads", "residue", "--sigma", "2"]
    steps = [
        ["learn-modes", "--particles", particles, "--structure",
         str(SCRIPT.parents[2] / "src" / "cryosvi" / "data" / "1ol5.pdb"), *structure,
         "-o", str(root / "learnt.npz")],
        ["train", "--particles", particles, "--reference", str(root / "learnt.npz"),
         "--latents", "modes", "--epochs", "2", "-o", str(root / "run")],
        ["infer", "--run", str(root / "run"), "--particles", particles, "-o",
         str(root / "posterior.star"), "--refine", "laplace"],
        ["analyze", "--posterior", str(root / "posterior.star"), "--run", str(root / "run"),
         "-o", str(root / "analysis"), "--datadir", str(data), "--bins", "3",
         "--reconstruct"]]
    for step in steps:
        assert main([*step, "--quiet"]) == 0, step[0]
    return root


def _bins_mean_truth(root):
    truth = starfile.read(root / "data" / "particles.star", always_dict=True)["particles"]
    truth = truth.set_index(truth["rlnImageName"].str.partition("@")[0].astype(int))
    means = []
    for k in (1, 2, 3):
        table = starfile.read(root / "analysis" / "bins" / f"bin_{k}.star",
                              always_dict=True)["particles"]
        numbers = table["rlnImageName"].str.partition("@")[0].astype(int)
        means.append(truth.loc[numbers, "cryosviTrueConformation"].mean())
    return np.array(means)


def test_analyze_bins_follow_the_true_hinge(analysed):
    means = _bins_mean_truth(analysed)
    steps = np.diff(means)
    assert (steps > 0).all() or (steps < 0).all(), means
    assert abs(means[-1] - means[0]) > 10, means  # of the 30 deg of the data


def _ca(positions, residues, names):
    """{residue number: C-alpha position}."""
    return {int(r): p for p, r, n in zip(positions, residues, names) if n == "CA"}


def _rmsd_superposed(a: np.ndarray, b: np.ndarray) -> float:
    """C-alpha RMSD after the least-squares superposition of b on a (Kabsch)."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1, 1, d]) @ vt
    return float(np.sqrt(np.mean(np.sum((b @ rotation - a) ** 2, axis=1))))


def test_analyze_end_models_are_nearer_their_own_end_states(analysed):
    import gemmi

    script = _load_script()
    truth = json.loads((analysed / "data" / "truth.json").read_text())
    structure = script.load_chain(truth["structure"]["path"], "A")
    positions, _, residues, names = script.atom_arrays(structure)
    hinge = truth["conformation"]
    ends = [script.hinge_conformation(positions, residues,
                                      np.array(hinge["axis_point_in_file_angst"]),
                                      np.array(hinge["axis_direction"]), angle)
            for angle in (0.0, hinge["bin_angles_deg"][-1])]
    ends = [_ca(end, residues, names) for end in ends]
    ensemble = gemmi.read_structure(str(analysed / "analysis" / "ensemble.pdb"))
    assert len(ensemble) == 3
    models = [{r.seqid.num: np.array(r["CA"][0].pos.tolist()) for r in model["A"]
               if r.find_atom("CA", "*") and r.seqid.num in ends[0]}
              for model in (ensemble[0], ensemble[2])]
    common = sorted(set(models[0]) & set(ends[0]))
    assert len(common) > 250
    increasing = _bins_mean_truth(analysed)[-1] > _bins_mean_truth(analysed)[0]
    own = [ends[0], ends[1]] if increasing else [ends[1], ends[0]]
    for model, mine, other in zip(models, own, own[::-1]):
        coordinates = np.array([model[r] for r in common])
        near = _rmsd_superposed(np.array([mine[r] for r in common]), coordinates)
        far = _rmsd_superposed(np.array([other[r] for r in common]), coordinates)
        assert near < far, (near, far)


def test_analyze_end_maps_correlate_with_their_own_end_state(analysed):
    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    maps = analysed / "data" / "maps"
    true = [mrcfile.read(maps / f"conformation_{k:03d}.mrc") for k in (0, ANALYZE_BINS - 1)]
    increasing = _bins_mean_truth(analysed)[-1] > _bins_mean_truth(analysed)[0]
    own = true if increasing else true[::-1]
    for k, mine, other in ((1, own[0], own[1]), (3, own[1], own[0])):
        reconstruction = mrcfile.read(analysed / "analysis" / "bins" / f"bin_{k}.mrc")
        assert reconstruction.shape == mine.shape
        assert corr(reconstruction, mine) > corr(reconstruction, other)
