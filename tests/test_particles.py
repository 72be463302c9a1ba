"""read_particles on every RELION dialect: metadata in RELION 3.1 terms, images, writers,
and each bad input's one-line error."""

import re
import shutil
import subprocess
import time
import types
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosvi.cli.main import main
from cryosvi.config import Optics
from cryosvi.dataset import check_compatible, model_optics
from cryosvi.errors import CryosviError
from cryosvi.io.particles import CryosviWarning, read_particles, write_particles
from particle_files import (PIXEL_ORIGINS31_ANGST_X, quiet, write_pixel_origins31,
                            write_relion30, write_relion31, write_stack)


# ------------------------------------------------------------------- RELION 3.1 and later
def test_relion31_groups_in_either_order_with_column_numbers(tmp_path):
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0, pixel2=1.5))
    frame = ps.metadata
    assert ps.source == "relion3.1" and len(ps) == 3 and len(ps.optics) == 2
    # every row gets its group's values
    assert frame["rlnVoltage"].tolist() == [300.0, 200.0, 300.0]
    assert frame["rlnImageSize"].tolist() == [8, 8, 8]
    assert frame["rlnPhaseShift"].tolist() == [0.0] * 3  # absent -> 0
    assert frame["rlnMicrographName"].tolist() == ["mic1.mrc", "mic1.mrc", "mic2.mrc"]
    np.testing.assert_array_equal(frame["rlnDefocusV"], [9000.0, 10500.0, 12000.0])
    assert ps.has_poses and not ps.has_shifts
    # groups differing in voltage are served (per-group CTF); the first group's values
    # stand for the data set
    assert model_optics(ps).voltage == 300.0
    # ... but not groups differing in pixel size: one projection grid
    with pytest.raises(CryosviError, match="different pixel sizes \\(1.5, 2 Å\\)"):
        model_optics(read_particles(write_relion31(tmp_path, voltage2=200.0, pixel2=2.0)))


def test_groups_with_the_same_optics_are_served(tmp_path):
    ps = read_particles(write_relion31(tmp_path))
    assert model_optics(ps) == Optics(voltage=300.0, spherical_aberration=2.7,
                                      amplitude_contrast=0.1, pixel_size=1.5, box=8)


def test_images_from_several_stacks_with_any_padding(tmp_path):
    path = write_relion31(tmp_path)
    with mrcfile.open(tmp_path / "a.mrcs") as a, mrcfile.open(tmp_path / "b.mrcs") as b:
        expected = np.stack([a.data[0], a.data[1], b.data[2]])
    ps = read_particles(path)
    images = ps.images([2, 0, 1])
    assert images.dtype == np.float32 and images.shape == (3, 8, 8)
    np.testing.assert_array_equal(images, expected[[2, 0, 1]])
    np.testing.assert_array_equal(read_particles(path, invert=True).images([0]), -expected[:1])


def test_metadata_needs_no_stacks(tmp_path):
    path = write_relion31(tmp_path)
    (tmp_path / "a.mrcs").unlink()
    ps = read_particles(path)
    assert len(ps) == 3
    with pytest.raises(CryosviError, match="a.mrcs.*not found.*--datadir"):
        ps.images([0])


def one_group_optics() -> pd.DataFrame:
    """An optics table of one group of 8 px images at 1.5 Å."""
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                         "rlnImagePixelSize": [1.5], "rlnImageSize": [8]})


def test_single_2d_image_and_datadir(tmp_path):
    stacks = tmp_path / "elsewhere"
    stacks.mkdir()
    image = write_stack(stacks / "one.mrc", single=True)
    frame = pd.DataFrame({"rlnImageName": ["one.mrc", "1@Extract/job9/one.mrc"],
                          "rlnDefocusU": [1e4, 1e4], "rlnOpticsGroup": [1, 1]})
    optics = one_group_optics()
    starfile.write({"optics": optics, "particles": frame}, tmp_path / "p.star")
    ps = read_particles(tmp_path / "p.star", datadir=stacks)
    np.testing.assert_array_equal(ps.images([0, 1]), np.concatenate([image, image]))


def test_a_name_without_an_image_number_must_name_a_single_image(tmp_path):
    """'stack.mrcs' alone names a file's only image; on a stack of 4 it is refused
    rather than read as image 1."""
    write_stack(tmp_path / "four.mrcs")
    frame = pd.DataFrame({"rlnImageName": ["2@four.mrcs", "four.mrcs"],
                          "rlnDefocusU": [1e4, 1e4], "rlnOpticsGroup": [1, 1]})
    optics = one_group_optics()
    starfile.write({"optics": optics, "particles": frame}, tmp_path / "p.star")
    with pytest.raises(CryosviError, match="particle 2 .*without an image number.*4 images"):
        read_particles(tmp_path / "p.star").images([0])


# Origins in pixels, pixel sizes 1.5 and 2.0 Å (groups 1, 2, 2): by hand, Å = px * pixel.
PIXEL_ORIGINS_ANGST = {"rlnOriginXAngst": [1.0 * 1.5, 3.0 * 2.0, -0.5 * 2.0],
                       "rlnOriginYAngst": [-2.0 * 1.5, 4.0 * 2.0, 0.25 * 2.0]}


def test_relion31_origins_in_pixels_become_angstrom_per_optics_group(tmp_path):
    """A RELION 3.1 file with rlnOriginX/Y (pixels, as ASPIRE writes): each particle's
    shift times its optics group's pixel size, silently (nothing is mixed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryosviWarning)
        ps = read_particles(write_pixel_origins31(tmp_path))
    frame = ps.metadata
    assert ps.source == "relion3.1" and frame["rlnOpticsGroup"].tolist() == [1, 2, 2]
    for column, expected in PIXEL_ORIGINS_ANGST.items():
        np.testing.assert_allclose(frame[column], expected, rtol=1e-12)
    assert "rlnOriginX" not in frame and "rlnOriginY" not in frame
    assert ps.has_shifts
    # written back: RELION 3.1 Å columns in the pixel columns' places, read by starfile
    write_particles(tmp_path / "out.star", ps, frame, [])
    raw = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert list(raw.columns)[4:6] == ["rlnOriginXAngst", "rlnOriginYAngst"]
    assert "rlnOriginX" not in raw and "rlnOriginY" not in raw
    for column, expected in PIXEL_ORIGINS_ANGST.items():
        np.testing.assert_allclose(raw[column], expected, rtol=1e-6)


def test_a_file_with_origins_in_pixels_and_angstrom_warns_and_angstrom_wins(tmp_path):
    """rlnOriginX (px) and rlnOriginXAngst both given: the Å column (7, -8, 9.5 Å) is
    used, not the pixel one (1.5, 6, -1 Å: up to 14 Å apart), with one warning that says
    so; rlnOriginY (px only) is converted."""
    with pytest.warns(CryosviWarning) as caught:
        ps = read_particles(write_pixel_origins31(tmp_path, mixed=True))
    messages = [str(w.message) for w in caught if issubclass(w.category, CryosviWarning)]
    assert len(messages) == 1, messages
    assert re.search(r"rlnOriginX and rlnOriginXAngst .*differ by up to 14 Å.*the Å "
                     r"column is used; rlnOriginY converted", messages[0]), messages[0]
    np.testing.assert_allclose(ps.metadata["rlnOriginXAngst"], PIXEL_ORIGINS31_ANGST_X)
    np.testing.assert_allclose(ps.metadata["rlnOriginYAngst"],
                               PIXEL_ORIGINS_ANGST["rlnOriginYAngst"])
    assert "rlnOriginX" not in ps.metadata and "rlnOriginX" not in ps.output_columns
    assert ps.output_columns.count("rlnOriginXAngst") == 1


def test_relion30_file_with_angstrom_origins_too_keeps_them(tmp_path):
    """The RELION 3.0 reader takes the same path: an Å column is not overwritten by the
    converted pixel one."""
    path = write_relion30(tmp_path, n=3)
    text = path.read_text().replace("_rlnAnglePsi #13\n", "_rlnAnglePsi #13\n"
                                    "_rlnOriginYAngst #14\n")
    rows = text.splitlines()
    path.write_text("\n".join(rows[:-3] + [f"{row} {7.0 + i}" for i, row in
                                           enumerate(rows[-3:])]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ps = read_particles(path)
    assert any("rlnOriginY and rlnOriginYAngst" in str(w.message) for w in caught)
    np.testing.assert_allclose(ps.metadata["rlnOriginYAngst"], [7.0, 8.0, 9.0])
    np.testing.assert_allclose(ps.metadata["rlnOriginXAngst"], 5.0 * (np.arange(3) - 1.5))


def test_relion30_origins_as_relion_converts_them_or_skip(tmp_path):
    """RELION's own conversion of a 3.0 file (relion_star_handler writes it as 3.1 with
    rlnOriginXAngst/YAngst) gives the same Å origins as read_particles."""
    if not shutil.which("relion_star_handler"):
        pytest.skip("relion_star_handler not on PATH")
    path = write_relion30(tmp_path)
    relion = relion_reads(path, tmp_path)["particles"]
    ps = quiet(read_particles, path)
    for column in ("rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(ps.metadata[column], relion[column], rtol=1e-6)


# ------------------------------------------------------------------------- RELION 3.0
def test_relion30_single_table(tmp_path):
    path = write_relion30(tmp_path)
    with pytest.warns(CryosviWarning, match="amplitude contrast"):
        ps = read_particles(path)
    frame = ps.metadata
    assert ps.source == "relion3.0" and len(ps) == 4
    np.testing.assert_allclose(frame["rlnImagePixelSize"], 5.0)  # 5 µm * 1e4 / 10000
    np.testing.assert_allclose(frame["rlnAmplitudeContrast"], 0.1)
    # origins in pixels -> Å
    np.testing.assert_allclose(frame["rlnOriginXAngst"], 5.0 * (np.arange(4) - 1.5))
    np.testing.assert_allclose(frame["rlnOriginYAngst"], 5.0 * 2 * np.arange(4))
    assert "rlnOriginX" not in frame
    # one optics group per distinct optics values: 300 kV x 3, 200 kV x 1
    assert len(ps.optics) == 2
    assert sorted(frame.groupby("rlnOpticsGroup").size().tolist()) == [1, 3]
    # no rlnImageSize: from the stack
    assert "rlnImageSize" not in frame
    assert ps.images([0]).shape == (1, 8, 8)
    assert ps.metadata["rlnImageSize"].tolist() == [8] * 4
    assert ps.has_shifts


def test_shifts_are_not_warned_about(tmp_path):
    """The forward model applies the file's shifts: check_compatible says nothing of them."""
    ps = quiet(read_particles, write_relion30(tmp_path, n=3))
    ps.metadata["rlnVoltage"] = 300.0  # one optics group's values everywhere
    assert ps.has_shifts
    # check_compatible reads only the reference's optics
    reference = types.SimpleNamespace(optics=Optics(pixel_size=5.0, box=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryosviWarning)
        optics = check_compatible(ps, reference)
    assert optics.pixel_size == 5.0


# ------------------------------------------------------------------------------ writing
def relion_reads(path, tmp_path):
    """relion_star_handler's own reader (RELION 3.1 with optics groups): the rows it
    writes back."""
    out = tmp_path / "relion_out.star"
    result = subprocess.run(["relion_star_handler", "--i", str(path), "--o", str(out),
                             "--select", "rlnDefocusU", "--minval", "0", "--maxval", "1e9"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return starfile.read(out, always_dict=True)


@pytest.mark.parametrize("dialect", ["relion31", "relion30"])
def test_star_writer_keeps_optics_columns_and_order(tmp_path, dialect):
    path = (write_relion31(tmp_path, voltage2=200.0) if dialect == "relion31"
            else quiet(write_relion30, tmp_path))
    ps = quiet(read_particles, path)
    frame = ps.metadata.copy()
    frame["rlnAngleRot"] = 1.0
    frame["cryosviDefocusStd"] = 50.0
    written = write_particles(tmp_path / "out.star", ps, frame, ["rlnAngleRot",
                                                                 "cryosviDefocusStd"])
    assert written == [tmp_path / "out.star"]
    raw = starfile.read(tmp_path / "out.star", always_dict=True)
    assert list(raw) == ["optics", "particles"]
    expected = [c for c in ps.output_columns] + ["cryosviDefocusStd"]
    assert list(raw["particles"].columns) == expected
    assert list(raw["particles"]["rlnImageName"]) == list(ps.metadata["rlnImageName"])
    assert "rlnVoltage" not in raw["particles"] and "rlnOriginX" not in raw["particles"]
    back = read_particles(tmp_path / "out.star")
    for column in ("rlnVoltage", "rlnImagePixelSize", "rlnOriginXAngst", "rlnDefocusU"):
        np.testing.assert_allclose(back.metadata[column], ps.metadata[column], rtol=1e-6)
    if shutil.which("relion_star_handler"):
        relion = relion_reads(tmp_path / "out.star", tmp_path)
        assert len(relion["particles"]) == len(ps)
        assert len(relion["optics"]) == len(ps.optics)
        np.testing.assert_allclose(relion["particles"]["rlnDefocusU"],
                                   ps.metadata["rlnDefocusU"])


def test_relion_reads_the_written_file_or_skip(tmp_path):
    if not shutil.which("relion_star_handler"):
        pytest.skip("relion_star_handler not on PATH")
    ps = read_particles(write_relion31(tmp_path))
    write_particles(tmp_path / "out.star", ps, ps.metadata, [])
    relion = relion_reads(tmp_path / "out.star", tmp_path)
    assert list(relion["particles"]["rlnImageName"]) == list(ps.metadata["rlnImageName"])


def test_simulate_round_trip_is_exact(tmp_path):
    from cryosvi.config import PAPER_PRESET
    from cryosvi.reference import build_reference
    from cryosvi.simulate import simulate_dataset

    reference = build_reference(None, None, 2, **PAPER_PRESET)
    simulate_dataset(reference, 6, tmp_path / "sim", seed=3)
    ps = read_particles(tmp_path / "sim" / "particles.star")
    raw = starfile.read(tmp_path / "sim" / "particles.star", always_dict=True)
    assert ps.output_columns == list(raw["particles"].columns)
    for column in raw["particles"].columns:
        np.testing.assert_array_equal(ps.metadata[column].to_numpy(),
                                      raw["particles"][column].to_numpy(), err_msg=column)
    pd.testing.assert_frame_equal(ps.optics, raw["optics"], check_dtype=False)
    with mrcfile.open(tmp_path / "sim" / "particles.mrcs") as mrc:
        np.testing.assert_array_equal(ps.images(np.arange(6)), mrc.data)


# ----------------------------------------------------------------------- bad inputs
def damage_star(old, new):
    def damage(directory):
        path = directory / "particles.star"
        path.write_text(path.read_text().replace(old, new, 1))
    return damage


def truncate_mid_row(directory):
    path = directory / "particles.star"
    text = path.read_text()
    cut = text.index("11000.0 10500.0") + 4
    path.write_text(text[:cut])


def float_stack_with_mode_0(directory):
    with mrcfile.mmap(directory / "a.mrcs", mode="r+", permissive=True) as mrc:
        mrc.header.mode = 0


def nan_pixel(directory):
    with mrcfile.open(directory / "b.mrcs", mode="r+") as mrc:
        mrc.data[2, 1, 1] = np.nan


def index_past_end(directory):
    damage_star("00003@b.mrcs", "4@b.mrcs")(directory)


BAD = [
    (lambda d: (d / "a.mrcs").unlink(), "a.mrcs.*not found.*--datadir"),
    (index_past_end, "b.mrcs has 3 image.*image 4"),
    (damage_star("opticsGroup2 2 300.0 2.7 0.1 1.5 8", "opticsGroup2 2 300.0 2.7 0.1 1.5 10"),
     "holds 8 px images but optics group 2 says 10 px"),
    (nan_pixel, "particle 3 contains NaN or Inf pixels"),
    (truncate_mid_row, r"line 2\d: row cut short"),
    (damage_star("11000.0 10500.0", "11000.0 10500.0 7"), r"line 2\d: row too long"),
    (damage_star("11000.0 10500.0", "abc 10500.0"), "rlnDefocusU is 'abc', not a finite"),
    (damage_star("11000.0 10500.0", "nan 10500.0"), "rlnDefocusU is .*nan.*not a finite"),
    (damage_star("opticsGroup1 1 300.0", "opticsGroup1 1 -300.0"),
     "rlnVoltage -300 must be > 0 kV"),
    (damage_star("opticsGroup1 1 300.0 2.7 0.1", "opticsGroup1 1 300.0 2.7 1.5"),
     r"rlnAmplitudeContrast 1.5 must be in \[0, 1\)"),
    (damage_star("opticsGroup1 1 300.0 2.7", "opticsGroup1 1 300.0 -2.7"),
     "rlnSphericalAberration -2.7 must be >= 0"),
    (damage_star("opticsGroup1 1 300.0 2.7 0.1 1.5", "opticsGroup1 1 300.0 2.7 0.1 0"),
     "rlnImagePixelSize 0 must be > 0"),
    (damage_star("opticsGroup1 1 300.0", "opticsGroup1 1 kV"), "rlnVoltage is 'kV'"),
    (float_stack_with_mode_0, "mode 0 .*but the file holds"),
    (lambda d: (d / "particles.star").write_bytes(b"\x00\x01binary junk"),
     "neither a STAR file nor"),
    (lambda d: (d / "particles.star").write_text("loop_\n_rlnImageName\n"),
     "line 1: expected a 'data_' block"),
]


@pytest.mark.parametrize("damage, message", BAD)
def test_bad_input_one_line_error(tmp_path, capsys, damage, message):
    write_relion31(tmp_path)
    damage(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["inspect", str(tmp_path / "particles.star"), "-o",
                     str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("cryosvi inspect: error:"), err
    assert re.search(message, err), err
    assert not (tmp_path / "p.png").exists()


def test_header_pixel_size_mismatch_warns_and_metadata_wins(tmp_path):
    path = write_relion31(tmp_path)
    with mrcfile.open(tmp_path / "a.mrcs", mode="r+") as mrc:
        mrc.voxel_size = 3.0
    ps = read_particles(path)
    with pytest.warns(CryosviWarning, match="3 Å differs from the metadata's 1.5"):
        ps.images([0])
    assert ps.metadata["rlnImagePixelSize"].iloc[0] == 1.5


def test_file_not_found_names_it(tmp_path):
    with pytest.raises(CryosviError, match="particle file not found"):
        read_particles(tmp_path / "nope.star")


# ----------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_a_million_rows_read_back(tmp_path):
    """10^6 rows (read a piece at a time): every row, its values and its image; the time
    is printed, not asserted (speed belongs to benchmarks)."""
    header, _, _ = RELION31_HEADER.partition("ROWS")
    row = "000001@a.mrcs 10000.0 9000.0 30.0 10.0 20.0 30.0 0.0 0.0 1 mic1.mrc\n"
    last = "000007@a.mrcs 11000.0 9000.0 30.0 10.0 20.0 30.0 0.0 0.0 1 mic1.mrc\n"
    (tmp_path / "big.star").write_text(header + row * 999_999 + last)
    start = time.perf_counter()
    ps = read_particles(tmp_path / "big.star")
    print(f"10^6 rows read in {time.perf_counter() - start:.2f} s")
    assert len(ps) == 1_000_000
    defocus = ps.column("rlnDefocusU")
    assert (defocus[:-1] == 10000.0).all() and defocus[-1] == 11000.0
    assert ps.column("rlnImageName")[-1] == "000007@a.mrcs"


RELION31_HEADER = write_relion31.__globals__["RELION31"].split("data_particles")[1]
RELION31_HEADER = ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n"
                   "_rlnAmplitudeContrast\n_rlnImagePixelSize\n_rlnImageSize\n"
                   "1 300 2.7 0.1 1.5 8\n\ndata_particles"
                   + RELION31_HEADER.split("000001@")[0] + "ROWS")


def test_relion_reconstruct_reads_the_written_file_or_skip(tmp_path):
    """relion_reconstruct reads what write_particles writes (the writer of cryosvi
    infer): stacks, poses, CTF and optics. A noise-free simulation reconstructed from
    the written poses is the pseudo-atoms' density (RELION's axes and origin)."""
    if not shutil.which("relion_reconstruct"):
        pytest.skip("relion_reconstruct not on PATH")
    from cryosvi.config import PAPER_PRESET, Noise
    from cryosvi.reference import build_reference
    from cryosvi.simulate import simulate_dataset

    reference = build_reference(None, None, 2, **{**PAPER_PRESET,
                                                  "noise": Noise(snr=float("inf"))})
    simulate_dataset(reference, 300, tmp_path / "sim", seed=4)
    ps = read_particles(tmp_path / "sim" / "particles.star")
    write_particles(tmp_path / "sim" / "posterior.star", ps, ps.metadata,
                    ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    result = subprocess.run(["relion_reconstruct", "--i", "posterior.star", "--o",
                             "map.mrc", "--ctf"], cwd=tmp_path / "sim",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with mrcfile.open(tmp_path / "sim" / "map.mrc") as mrc:
        volume = np.asarray(mrc.data, dtype=float)
    box, pixel = reference.optics.box, reference.optics.pixel_size
    assert volume.shape == (box, box, box) and np.isfinite(volume).all()
    # the pseudo-atoms' own density on RELION's [z, y, x] grid, origin at box // 2
    axis = (np.arange(box) - box // 2) * pixel
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = np.stack([x, y, z], -1)[..., None, :]
    atoms = np.exp(-((grid - reference.coords) ** 2).sum(-1) / (2 * 2.0**2)).sum(-1)
    # measured: 0.988 with the true poses, 0.77 with tilt mirrored, 0.63 shuffled
    assert np.corrcoef(volume.ravel(), atoms.ravel())[0, 1] > 0.95


def test_cryodrgn_parser_reads_the_written_file_or_skip(tmp_path):
    """cryoDRGN's own STAR parser (cryodrgn.starfile.Starfile; skipped when cryoDRGN is
    not installed) reads the RELION 3.1 file cryosvi writes, with each particle's optics
    group values."""
    cryodrgn_starfile = pytest.importorskip("cryodrgn.starfile")
    ps = read_particles(write_relion31(tmp_path, voltage2=200.0))
    frame = ps.metadata.copy()
    frame["rlnAngleRot"] = [10.0, 20.0, 30.0]
    write_particles(tmp_path / "out.star", ps, frame, ["rlnAngleRot"])
    theirs = cryodrgn_starfile.Starfile(str(tmp_path / "out.star"))
    assert len(theirs) == 3 and theirs.relion31
    np.testing.assert_allclose(theirs.get_optics_values("_rlnVoltage"), [300, 200, 300])
    np.testing.assert_allclose(theirs.df["_rlnAngleRot"].astype(float), [10, 20, 30])
    assert list(theirs.df["_rlnImageName"]) == list(ps.metadata["rlnImageName"])


def test_a_defocus_v_without_u_is_warned(tmp_path):
    """A file with rlnDefocusV but no rlnDefocusU: its CTF estimates cannot be used, and
    the reading says so in a warning."""
    write_stack(tmp_path / "a.mrcs")
    optics = one_group_optics()
    frame = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"],
                          "rlnDefocusV": [1e4, 1e4], "rlnOpticsGroup": [1, 1]})
    starfile.write({"optics": optics, "particles": frame}, tmp_path / "v.star")
    with pytest.warns(CryosviWarning, match="rlnDefocusV without rlnDefocusU"):
        read_particles(tmp_path / "v.star")
