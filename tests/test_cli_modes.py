"""``cryosvi modes``: the .npz it writes, its movies, its errors (one line, no traceback)
and its atomic write."""

import subprocess
import sys

import numpy as np
import prody
import pytest

from cryosvi.physics.anm import anm_modes
from cryosvi.cli.main import main
from cryosvi.physics.structure import default_structure_path, load_pseudo_atoms

prody.confProDy(verbosity="none")
UBQ = "/work/shared/data/1ubq.pdb"


def test_writes_coords_eigenvalues_modes_and_movies(tmp_path, capsys):
    output, movie = tmp_path / "modes.npz", tmp_path / "movie"
    assert main(["modes", "--chain", "A", "--stride", "2", "--n-modes", "3", "-o",
                 str(output), "--movie", str(movie), "--movie-frames", "6"]) == 0
    assert "133 pseudo-atoms" in capsys.readouterr().out
    atoms = load_pseudo_atoms(default_structure_path(), chain="A", stride=2)
    expected = anm_modes(atoms.coords, n_modes=3)
    with np.load(output) as saved:
        assert saved["coords"].shape == (133, 3)
        assert saved["eigenvalues"].shape == (3,) and saved["modes"].shape == (3, 133, 3)
        np.testing.assert_allclose(saved["coords"], atoms.coords)
        np.testing.assert_allclose(saved["eigenvalues"], expected.eigenvalues, rtol=1e-10)
        np.testing.assert_allclose(saved["modes"], expected.vectors, atol=1e-10)
        # the file frame can be rebuilt: the CA atoms as ProDy reads them
        ca = prody.parsePDB(str(default_structure_path())).select("chain A and name CA")
        np.testing.assert_allclose(saved["coords"] + saved["centroid"],
                                   ca.getCoords()[::2], atol=1e-9)
        assert "TPO" in saved["residue_names"].tolist()
    assert sorted(p.name for p in movie.iterdir()) == [".cryosvi", "mode_01.pdb", "mode_02.pdb",
                                                       "mode_03.pdb"]
    frames = prody.parsePDB(str(movie / "mode_02.pdb"))
    assert frames.numCoordsets() == 6 and frames.numAtoms() == 133
    np.testing.assert_allclose(frames.getCoordsets()[0], ca.getCoords()[::2], atol=1e-3)
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


def test_options_reach_the_computation(tmp_path, capsys):
    atoms = load_pseudo_atoms(UBQ, stride=1)
    for extra, cutoff, gamma in ((["--gamma", "2.5"], 15.0, 2.5),
                                 (["--cutoff", "11"], 11.0, 1.0)):
        output = tmp_path / "m.npz"
        assert main(["modes", "--structure", UBQ, "--n-modes", "4", "-o", str(output),
                     "--force", *extra]) == 0
        expected = anm_modes(atoms.coords, n_modes=4, cutoff=cutoff, gamma=gamma)
        with np.load(output) as saved:
            np.testing.assert_allclose(saved["eigenvalues"], expected.eigenvalues, rtol=1e-10)
            assert float(saved["cutoff"]) == cutoff and float(saved["gamma"]) == gamma


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryosvi modes: error: "), lines
    return lines[0]


def test_user_mistakes_give_one_line(tmp_path, capsys):
    out = str(tmp_path / "m.npz")
    assert "not found" in error_line(capsys, ["modes", "--structure",
                                              str(tmp_path / "nope.pdb"), "-o", out])
    assert "available chains: A, B" in error_line(capsys, ["modes", "--chain", "Z", "-o", out])
    # 1UBQ at stride 20: 4 pseudo-atoms, 3N - 6 = 6 internal modes
    assert "< 3N - 6 = 6" in error_line(capsys, ["modes", "--structure", UBQ, "--stride",
                                                 "20", "--n-modes", "6", "-o", out])
    (tmp_path / "file").write_text("")
    assert "not a directory" in error_line(capsys, ["modes", "-o",
                                                    str(tmp_path / "file" / "m.npz")])
    assert "is not a directory" in error_line(capsys, ["modes", "-o", str(tmp_path / "d.npz"),
                                                       "--movie", str(tmp_path / "file")])
    (tmp_path / "dir.npz").mkdir()
    assert "is a directory" in error_line(capsys, ["modes", "-o", str(tmp_path / "dir.npz")])
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("option,value", [("--stride", "0"), ("--cutoff", "-1"),
                                          ("--gamma", "0"), ("--n-modes", "0"),
                                          ("--cutoff", "inf"), ("--gamma", "nan"),
                                          ("--n-modes", "two")])
def test_bad_numbers_are_rejected_by_argparse(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["modes", option, value, "-o", str(tmp_path / "m.npz")])
    assert exit_.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_disconnected_network_warning_is_printed(tmp_path, capsys):
    assert main(["modes", "--structure", UBQ, "--stride", "3", "--cutoff", "6", "-o",
                 str(tmp_path / "m.npz"), "--n-modes", "2"]) == 0
    assert "cryosvi modes: warning: the elastic network has" in capsys.readouterr().err


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch, capsys):
    output = tmp_path / "m.npz"
    assert main(["modes", "--structure", UBQ, "--n-modes", "2", "-o", str(output)]) == 0
    old = output.read_bytes()

    def broken(handle, **arrays):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken)
    capsys.readouterr()
    code = main(["modes", "--structure", UBQ, "--n-modes", "2", "-o", str(output), "--force"])
    err = capsys.readouterr().err
    assert code == 1 and err == "cryosvi modes: error: No space left on device\n"
    assert output.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


def test_command_line_process_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cryosvi.cli.main", "modes", "--structure",
                           str(tmp_path / "missing.cif"), "-o", str(tmp_path / "m.npz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"cryosvi modes: error: structure file not found: {tmp_path / 'missing.cif'}"]
