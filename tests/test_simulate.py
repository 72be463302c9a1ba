"""``cryosvi simulate`` end to end: files read back by mrcfile/starfile, the data-set SNR,
reproducibility, atomic output and clear errors for nonsense input."""

import math
import subprocess
import sys

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
def test_large_simulation_streams_in_bounded_memory(tmp_path):
    # 10^5 images of 128 px (6.5 GB on disk) must not need more than 1 GiB of RAM.
    script = (
        "import resource, sys; from cryosvi.cli.main import main; "
        f"main(['simulate', '-o', r'{tmp_path / 'big'}', '-n', '100000', '--box', '128', "
        "'--pixel-size', '1.0', '--window', '13']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert math.isclose((tmp_path / "big" / "particles.mrcs").stat().st_size,
                        1024 + 100000 * 128 * 128 * 4, rel_tol=1e-3)
