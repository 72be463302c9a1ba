"""``cryosvi simulate`` end to end: files read back by mrcfile/starfile, the data-set SNR,
reproducibility, atomic output and clear errors for nonsense input."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryosvi.cli.main import main
from cryosvi.reference import Reference
from cryosvi.physics.rotations import euler_to_matrix

SMALL = ["-n", "40", "--seed", "3"]


@pytest.fixture(scope="module")
def noisy_and_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("simulate")
    assert main(["simulate", "-o", str(root / "noisy"), *SMALL]) == 0
    assert main(["simulate", "-o", str(root / "clean"), "--snr", "inf", *SMALL]) == 0
    return root / "noisy", root / "clean"


def test_files_read_back_with_independent_readers(noisy_and_clean):
    noisy, _ = noisy_and_clean
    with mrcfile.open(noisy / "particles.mrcs") as mrc:
        assert mrc.data.shape == (40, 32, 32) and mrc.data.dtype == np.float32
        assert mrc.voxel_size.x == pytest.approx(2.5)
        assert mrc.header.dmean == pytest.approx(float(mrc.data.mean()), abs=1e-4)
    star = starfile.read(noisy / "particles.star", always_dict=True)
    optics, particles = star["optics"], star["particles"]
    assert optics["rlnImageSize"].tolist() == [32]
    assert optics["rlnImagePixelSize"].tolist() == [2.5]
    assert optics["rlnVoltage"].tolist() == [300.0]
    assert particles["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnDefocusV",
                   "rlnDefocusAngle", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup",
                   "cryosviModeAmplitude1"):
        assert column in particles.columns
    assert len(particles) == 40
    reference = Reference.load(noisy / "reference.npz")
    assert reference.n_atoms == 133 and reference.n_modes == 1
    assert reference.imaging.window == 5 and reference.priors.defocus_mean == 10000


def test_snr_is_signal_variance_over_noise_variance(noisy_and_clean):
    noisy, clean = noisy_and_clean
    with mrcfile.open(noisy / "particles.mrcs") as a, mrcfile.open(clean / "particles.mrcs") as b:
        noise = a.data.astype(np.float64) - b.data
        signal_variance = b.data.astype(np.float64).var()
    std = Reference.load(noisy / "reference.npz").noise.std
    assert signal_variance / std**2 == pytest.approx(20.0, rel=1e-4)
    # 40 * 32 * 32 noise pixels: the sample std is within a few 1e-3 of the truth
    assert noise.std() == pytest.approx(std, rel=0.01)
    assert Reference.load(clean / "reference.npz").noise.std == 0.0


def test_star_angles_reproduce_the_simulated_image(noisy_and_clean):
    # The written Euler angles, through RELION's matrix, give back the clean image.
    _, clean = noisy_and_clean
    reference = Reference.load(clean / "reference.npz")
    particles = starfile.read(clean / "particles.star", always_dict=True)["particles"]
    angles = [torch.tensor(particles[c].to_numpy()) for c in
              ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    from cryosvi.physics.rotations import matrix_to_quaternion

    quaternion = matrix_to_quaternion(euler_to_matrix(*angles)).float()
    defocus = torch.tensor(particles["rlnDefocusU"].to_numpy(), dtype=torch.float32)
    modes = torch.tensor(particles[["cryosviModeAmplitude1"]].to_numpy(), dtype=torch.float32)
    images = reference.forward_model()(modes, quaternion, defocus)
    with mrcfile.open(clean / "particles.mrcs") as mrc:
        np.testing.assert_allclose(images.numpy(), mrc.data, atol=1e-4)


def test_same_seed_same_data(tmp_path, noisy_and_clean):
    noisy, _ = noisy_and_clean
    assert main(["simulate", "-o", str(tmp_path / "again"), *SMALL]) == 0
    with mrcfile.open(noisy / "particles.mrcs") as a, \
            mrcfile.open(tmp_path / "again" / "particles.mrcs") as b:
        np.testing.assert_array_equal(a.data, b.data)


def test_existing_output_needs_force(tmp_path, capsys):
    (tmp_path / "out").mkdir()  # an empty directory is used as it is
    assert main(["simulate", "-o", str(tmp_path / "out"), "-n", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".cryosvi", "particles.mrcs", "particles.star", "reference.npz"]
    capsys.readouterr()
    assert main(["simulate", "-o", str(tmp_path / "out"), "-n", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["simulate", "-o", str(tmp_path / "out"), "-n", "3", "--force"]) == 0
    assert "wrote 3 particles" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


@pytest.mark.parametrize("arguments, message", [
    (["--box", "-4"], "must be >= 1"),
    (["--snr", "0"], "must be >= 1e-06"),
    (["--pixel-size", "abc"], "not a number"),
    (["--box", "12"], "too small for the molecule"),
    (["--structure", "missing.pdb"], "missing.pdb"),
    (["--chain", "Z"], "chain"),
    (["--amp-contrast", "1.5"], "--amp-contrast"),
])
def test_nonsense_input_gets_one_line_error(tmp_path, capsys, arguments, message):
    try:
        code = main(["simulate", "-o", str(tmp_path / "x"), "-n", "2", *arguments])
    except SystemExit as exit_:  # argparse rejects bad option values itself
        code = exit_.code
    assert code == 2
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]  # argparse prints its usage above
    assert "error:" in last_line and message in last_line and "Traceback" not in error
    assert not (tmp_path / "x").exists()


def test_user_error_from_the_shell_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cryosvi.cli.main", "simulate", "-o", str(tmp_path / "x"),
         "--structure", str(tmp_path / "none.cif")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "none.cif" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_large_simulation_streams_in_bounded_memory(tmp_path):
    """10^5 images of 128 px (6.5 GB on disk) must not need more than 1 GiB of RAM.

    The peak is the child's own VmHWM (/proc/self/status: the high-water mark of the
    resident set of the address space that ``exec`` gave it, anonymous and file-backed
    pages together), not ``getrusage(RUSAGE_SELF).ru_maxrss``. At ``exec`` Linux folds the
    old address space's high-water mark into ru_maxrss (fs/exec.c, exec_mmap ->
    setmax_mm_hiwater_rss), and subprocess starts the child with vfork, whose old address
    space is pytest's own: ru_maxrss was max(pytest's peak so far, simulate's peak), so the
    test failed whenever an earlier test had taken pytest over 1 GiB, whatever simulate
    did (measured: a parent that peaked at 1227 MiB gave a 5000-image simulate
    ru_maxrss 1227 MiB, VmHWM 658 MiB). The stack is cleaned up here: 6.5 GB is too
    much to leave among pytest's kept temporary folders."""
    out = tmp_path / "big"
    script = (
        "import re; from cryosvi.cli.main import main; "
        f"main(['simulate', '-o', r'{out}', '-n', '100000', '--box', '128', "
        "'--pixel-size', '1.0', '--window', '13', '--quiet']); "
        "print(re.search(r'^VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read(), "
        "re.M).group(1))")
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        peak_kib = int(result.stdout.split()[-1])
        print(f"simulate's peak RSS (VmHWM): {peak_kib / 1024:.0f} MiB")
        assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
        assert math.isclose((out / "particles.mrcs").stat().st_size,
                            1024 + 100000 * 128 * 128 * 4, rel_tol=1e-3)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------ micrograph effects

EFFECTS = ["-n", "40", "--seed", "3", "--optics-groups", "2", "--max-shift", "3"]


def _stack(directory):
    with mrcfile.open(directory / "particles.mrcs") as mrc:
        return mrc.data.astype(np.float64)


def test_default_noise_is_todays_recipe(noisy_and_clean):
    """The defaults add white noise exactly as before coloured noise existed: the clean
    stack plus noise_std times torch.randn from a generator seeded seed + 1, one chunk
    of 256 images at a time, in float32 (so the same seed gives the same stack)."""
    noisy, clean = noisy_and_clean
    std = Reference.load(noisy / "reference.npz").noise.std
    white = torch.randn((40, 32, 32), generator=torch.Generator().manual_seed(3 + 1))
    with mrcfile.open(clean / "particles.mrcs") as mrc:
        expected = mrc.data + std * white.numpy()
    with mrcfile.open(noisy / "particles.mrcs") as mrc:
        np.testing.assert_array_equal(mrc.data, expected)
    assert Reference.load(noisy / "reference.npz").noise_model is None
    star = starfile.read(noisy / "particles.star", always_dict=True)["particles"]
    assert "cryosviTrueContrast" not in star


def _coloured_shape(box, excess, width, nyquist):
    """The spectrum per shell (round(|k|)), mean 1 over the full grid, from the formula."""
    k = np.fft.fftfreq(box, 1 / box)
    radius = np.hypot(k[:, None], k[None, :])
    nu = radius / box
    shape = (1 + excess * np.exp(-nu**2 / (2 * width**2))) * nyquist ** ((nu / 0.5) ** 2)
    shell = np.round(radius).astype(int)
    per_shell = np.bincount(shell.ravel(), shape.ravel()) / np.bincount(shell.ravel())
    return per_shell / shape.mean()


@pytest.fixture(scope="module")
def effects(tmp_path_factory):
    root = tmp_path_factory.mktemp("effects")
    runs = {"white": [], "coloured": ["--noise-spectrum", "coloured"],
            "clean": ["--snr", "inf"],
            "clean_effects": ["--snr", "inf", "--contrast-spread", "0.3", "--bfactor", "120"],
            "all": ["--noise-spectrum", "coloured", "--spectrum-excess", "2.5",
                    "--spectrum-nyquist", "0.5", "0.3", "--contrast-spread", "0.3",
                    "--bfactor", "120"],
            "levels": ["--noise-spread", "0.2"]}
    for name, options in runs.items():
        assert main(["simulate", "-o", str(root / name), "--quiet", *EFFECTS, *options]) == 0
    return root


def test_coloured_noise_filters_the_same_white_draws(effects):
    """Coloured noise is the white run's noise (same seed) filtered per optics group by
    the square root of the group's spectrum; the recorded NoiseModel holds std^2 times
    the spectra written out here from the formula (defaults 3, 0.05, 0.4 and 2, 0.08,
    0.25), and the SNR keeps its meaning."""
    clean = _stack(effects / "clean")
    white = _stack(effects / "white") - clean
    coloured = _stack(effects / "coloured") - clean
    reference = Reference.load(effects / "coloured" / "reference.npz")
    std = reference.noise.std
    assert std == pytest.approx(Reference.load(effects / "white" / "reference.npz").noise.std)
    noise = reference.noise_model
    shapes = np.stack([_coloured_shape(32, 3.0, 0.05, 0.4), _coloured_shape(32, 2.0, 0.08, 0.25)])
    np.testing.assert_allclose(noise.noise.numpy(), std**2 * shapes, rtol=1e-10)
    group = starfile.read(effects / "coloured" / "particles.star",
                          always_dict=True)["particles"]["rlnOpticsGroup"].to_numpy() - 1
    k = np.fft.fftfreq(32, 1 / 32)
    shell = np.round(np.hypot(k[:, None], k[None, :])).astype(int)
    filters = np.sqrt(shapes[:, shell])[group]  # full-grid filters per particle
    expected = np.fft.ifft2(np.fft.fft2(white) * filters).real
    np.testing.assert_allclose(coloured, expected, atol=1e-5 * std)
    assert clean.var() / std**2 == pytest.approx(20.0, rel=1e-4)
    assert noise.contrast_mean == 1 and noise.contrast_std == 0 and noise.bfactor == 0
    assert float(noise.signal_power[:, 1:4].min()) > 0


def test_contrast_and_envelope_on_the_clean_images(effects):
    """Each particle's clean image is the plain one (same seed) under the envelope
    exp(-B s^2 / 4) times its recorded lognormal contrast."""
    plain = _stack(effects / "clean")
    changed = _stack(effects / "clean_effects")
    contrast = starfile.read(effects / "clean_effects" / "particles.star",
                             always_dict=True)["particles"]["cryosviTrueContrast"].to_numpy()
    s = np.hypot(*np.meshgrid(np.fft.fftfreq(32, 2.5), np.fft.fftfreq(32, 2.5)))
    expected = np.fft.ifft2(np.fft.fft2(plain) * np.exp(-120 * s**2 / 4)).real
    expected *= contrast[:, None, None]
    np.testing.assert_allclose(changed, expected, atol=1e-5 * np.abs(plain).max())
    assert 0.5 < contrast.min() and contrast.max() < 2.5
    assert abs(np.log(contrast).std() - 0.3) < 0.1


def test_every_effect_recorded(effects):
    reference = Reference.load(effects / "all" / "reference.npz")
    noise = reference.noise_model
    shapes = np.stack([_coloured_shape(32, 2.5, 0.05, 0.5), _coloured_shape(32, 2.5, 0.08, 0.3)])
    np.testing.assert_allclose(noise.noise.numpy(), reference.noise.std**2 * shapes,
                               rtol=1e-10)
    assert noise.bfactor == 120 and noise.contrast_mean == 1
    assert noise.contrast_std == pytest.approx(math.sqrt(math.expm1(0.09)))
    assert noise.box == 32 and noise.pixel_size == 2.5 and noise.n_groups == 2
    # the SNR is the signal's variance after the effects over the noise's
    signal = _stack(effects / "clean_effects")
    assert signal.var() / reference.noise.std**2 == pytest.approx(20.0, rel=1e-4)


def test_noise_levels_scale_the_same_white_draws(effects):
    """--noise-spread n: each particle's noise is the white run's (same seed) times its
    recorded level lambda (lognormal, log-std n, E lambda^2 = 1), and the NoiseModel
    records the levels' log lambda^2 std 2 n."""
    clean = _stack(effects / "clean")
    white = _stack(effects / "white") - clean
    levels = _stack(effects / "levels") - clean
    level = starfile.read(effects / "levels" / "particles.star",
                          always_dict=True)["particles"]["cryosviTrueNoiseScale"].to_numpy()
    std = Reference.load(effects / "white" / "reference.npz").noise.std
    np.testing.assert_allclose(levels, white * level[:, None, None], atol=1e-5 * std)
    assert Reference.load(effects / "levels" / "reference.npz").noise_model.level_std == 0.4
    assert abs(np.log(level).std() - 0.2) < 0.07


@pytest.mark.parametrize("arguments, message", [
    (["--spectrum-excess", "2"], "--noise-spectrum coloured"),
    (["--noise-spread", "3"], "--noise-spread"),
    (["--noise-spectrum", "coloured", "--spectrum-width", "0.1", "0.1", "0.1"],
     "3 values for 2 optics group"),
    (["--contrast-spread", "-1"], "--contrast-spread"),
    (["--noise-spectrum", "coloured", "--spectrum-width", "0"], "--spectrum-width"),
])
def test_effect_options_refuse_nonsense(tmp_path, capsys, arguments, message):
    try:
        code = main(["simulate", "-o", str(tmp_path / "x"), "-n", "2", "--optics-groups", "2",
                     *arguments])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    error = capsys.readouterr().err
    assert message in error.strip().splitlines()[-1] and "Traceback" not in error
    assert not (tmp_path / "x").exists()


def test_help_states_the_default_spectra(capsys):
    from cryosvi.simulate import COLOURED

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for k, name in enumerate(("excess", "width", "nyquist")):
        assert f"{', '.join(str(c[k]) for c in COLOURED)} in turn" in text, name
