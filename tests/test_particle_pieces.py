"""A long STAR file read and written a piece of its rows at a time: the same table, the
same groups and warnings, and the same text as the whole file at once (starfile, an
independent reader and writer, as the reference); images by positioned reads equal to
mrcfile's."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosvi.errors import CryosviWarning
from cryosvi.io import star
from cryosvi.io.mrc import open_stack
from cryosvi.io.particles import read_particles, write_particles

from particle_files import write_stack

N = 300
PIECE_BYTES = 2000
"""Bytes of rows per piece in these tests: a few dozen rows, so N rows make ~20 pieces."""


def relion31_text(n: int = N, seed: int = 0) -> str:
    """A RELION 3.1 file written by hand: two optics groups, a comment line and a blank
    line among the rows, a column of whole numbers that turns fractional after the
    first rows (int in the first pieces, float in the later ones), micrograph names."""
    rng = np.random.default_rng(seed)
    lines = ["# version 30001", "", "data_optics", "", "loop_", "_rlnOpticsGroupName #1",
             "_rlnOpticsGroup #2", "_rlnVoltage #3", "_rlnSphericalAberration #4",
             "_rlnAmplitudeContrast #5", "_rlnImagePixelSize #6", "_rlnImageSize #7",
             "_rlnImageDimensionality #8",
             "opticsGroup1 1 300.0 2.7 0.1 1.5 8 2", "opticsGroup2 2 200.0 2.0 0.07 1.5 8 2",
             "", "", "# version 30001", "", "data_particles", "", "loop_"]
    labels = ["rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnDefocusV",
              "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
              "rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup", "rlnClassNumber"]
    lines += [f"_{label} #{k + 1}" for k, label in enumerate(labels)]
    for i in range(n):
        if i == 7:
            lines.append("# a comment among the rows")
        if i == 11:
            lines.append("")
        score = f"{i % 3 + 1}" if i < n // 2 else f"{i % 3 + 1.5}"
        lines.append(" ".join([
            f"{i % 5 + 1:06d}@Particles/s.mrcs", f"Movies/m_{i // 40:04d}.mrc",
            f"{rng.uniform(8000, 20000):.6f}", f"{rng.uniform(8000, 20000):.6f}",
            f"{rng.uniform(-180, 180):.6f}", f"{rng.uniform(-180, 180):.6f}",
            f"{rng.uniform(0, 180):.6f}", f"{rng.uniform(-180, 180):.6f}",
            f"{rng.normal():.6f}", f"{rng.normal():.6f}", str(i % 2 + 1), score]))
    return "\n".join(lines) + "\n"


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(star, "LOOP_BLOCK_BYTES", PIECE_BYTES)


def read_whole(path):
    """``read_particles`` with one piece for the whole file (the table as the reader
    always made it)."""
    previous = star.LOOP_BLOCK_BYTES
    star.LOOP_BLOCK_BYTES = 1 << 30
    try:
        return read_particles(path)
    finally:
        star.LOOP_BLOCK_BYTES = previous


def test_a_file_read_in_pieces_is_the_file_read_whole(tmp_path, small_pieces):
    path = tmp_path / "particles.star"
    path.write_text(relion31_text())
    pieces = read_particles(path)
    assert len(pieces._rows.pieces) > 10
    whole = read_whole(path)
    pd.testing.assert_frame_equal(pieces.metadata, whole.metadata)
    assert whole.metadata["rlnClassNumber"].dtype == np.float64  # promoted over the file
    # the independent reference: starfile's reading of the same text
    reference = starfile.read(path, always_dict=True)["particles"]
    for column in reference.columns:
        expected = reference[column].to_numpy()
        assert np.array_equal(pieces.metadata[column].to_numpy(), expected), column
    # what a set read in pieces has at hand equals the table, row for row
    fresh = read_particles(path)
    for column in whole.metadata.columns:
        assert np.array_equal(fresh.column(column), whole.metadata[column].to_numpy()), column
    rows = np.array([3, 250, 7, 7])
    known = [c for c in whole.metadata.select_dtypes("number") if c != "rlnClassNumber"]
    pd.testing.assert_frame_equal(fresh.numbers(rows),
                                  whole.metadata[known].iloc[rows].reset_index(drop=True))
    pd.testing.assert_frame_equal(whole.numbers(rows), fresh.numbers(rows))
    assert fresh.__dict__.get("_frame") is None  # none of that read the whole table


def test_streamed_star_is_what_starfile_writes_of_the_whole_table(tmp_path, small_pieces):
    """write_particles from the file's pieces, with added and replaced columns and rows
    left out: the data lines starfile writes of the whole table so updated."""
    path = tmp_path / "particles.star"
    path.write_text(relion31_text())
    particles = read_particles(path)
    rng = np.random.default_rng(1)
    added = {"rlnAngleRot": rng.uniform(-180, 180, N), "cryosviPoseStdDeg": rng.random(N),
             "cryosviRefinedBySMC": rng.integers(0, 2, N)}
    keep = rng.random(N) < 0.7
    asked = []

    def values(start, stop):
        asked.append((start, stop))
        return {name: value[start:stop] for name, value in added.items()}

    write_particles(tmp_path / "out.star", particles, added=list(added), values=values,
                    keep=keep)
    assert len(asked) == len(particles._rows.pieces)  # a piece at a time
    frame = read_whole(path).metadata
    for name, value in added.items():
        frame[name] = value
    columns = [*particles.output_columns, "cryosviPoseStdDeg", "cryosviRefinedBySMC"]
    starfile.write({"optics": particles.optics, "particles": frame[keep][columns]},
                   tmp_path / "reference.star")
    ours = (tmp_path / "out.star").read_text().splitlines()[1:]
    reference = (tmp_path / "reference.star").read_text().splitlines()[1:]
    assert ours == reference


def test_relion30_groups_and_warnings_are_the_whole_files(tmp_path, small_pieces):
    """A RELION 3.0 table (optics per row, origins in pixels and in Å) in pieces: one
    optics group per distinct set of optics values of the whole file, numbered in
    their sorted order, each row in its own; the warning about the origins said once,
    with the largest difference over every piece."""
    rng = np.random.default_rng(2)
    lines = ["data_", "loop_"] + [f"_{c}" for c in (
        "rlnImageName", "rlnDefocusU", "rlnVoltage", "rlnSphericalAberration",
        "rlnAmplitudeContrast", "rlnDetectorPixelSize", "rlnMagnification", "rlnOriginX",
        "rlnOriginXAngst")]
    voltage = np.where(np.arange(N) < N - 10, 300.0, 200.0)  # the 200 kV rows come last
    gap = np.zeros(N)
    gap[N - 3] = 1  # 1 px of 1 Å against 0.75 Å, in the last piece: the largest difference
    for i in range(N):
        lines.append(f"{i % 5 + 1}@s.mrcs {rng.uniform(8000, 20000):.2f} {voltage[i]:.1f} "
                     f"2.7 0.1 5.0 {50000.0 if i % 2 else 33333.3333:.4f} "
                     f"{1.0 if gap[i] else 0.0} {0.75 if gap[i] else 0.0}")
    path = tmp_path / "relion30.star"
    path.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        particles = read_particles(path)
    said = [str(w.message) for w in caught if issubclass(w.category, CryosviWarning)]
    assert len(said) == 1 and "origins both in pixels" in said[0], said
    pixel = 5.0 * 1e4 / 50000.0  # row N - 3 is odd: 50 000 x
    assert f"up to {abs(1.0 * pixel - 0.75):.3g} Å" in said[0]
    reference = starfile.read(path)
    sets = np.stack([reference["rlnVoltage"], reference["rlnSphericalAberration"],
                     reference["rlnAmplitudeContrast"],
                     reference["rlnDetectorPixelSize"] * 1e4 / reference["rlnMagnification"]],
                    -1)
    unique, inverse = np.unique(sets, axis=0, return_inverse=True)
    assert len(particles.optics) == len(unique) == 4
    np.testing.assert_array_equal(particles.column("rlnOpticsGroup"), inverse.ravel() + 1)
    np.testing.assert_array_equal(particles.metadata["rlnOpticsGroup"], inverse.ravel() + 1)
    np.testing.assert_allclose(particles.optics["rlnVoltage"], unique[:, 0])
    np.testing.assert_allclose(particles.column("rlnImagePixelSize"),
                               unique[inverse.ravel(), 3])


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_positioned_reads_give_mrcfiles_images(tmp_path, dtype):
    """Runs of consecutive images, repeats and any order: the images mrcfile reads."""
    images = (np.random.default_rng(3).normal(size=(40, 6, 6)) * 100).astype(dtype)
    with mrcfile.new(tmp_path / "s.mrcs") as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
    stack = open_stack(tmp_path / "s.mrcs")
    indices = np.array([5, 6, 7, 8, 39, 0, 1, 7, 7, 20, 19, 18])
    out = np.empty((len(indices), 6, 6), np.float32)
    stack.read(indices, out)
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        np.testing.assert_array_equal(out, mrc.data[indices].astype(np.float32))


def test_images_of_a_file_read_in_pieces(tmp_path, small_pieces):
    path = tmp_path / "particles.star"
    path.write_text(relion31_text())
    (tmp_path / "Particles").mkdir()
    images = write_stack(tmp_path / "Particles" / "s.mrcs", n=5, box=8)
    particles = read_particles(path)
    rows = np.array([0, 299, 5, 6, 7])
    np.testing.assert_array_equal(particles.images(rows), images[rows % 5])
    assert particles.stack_names() == ["Particles/s.mrcs"]


MEMORY_CHILD = """
import re, sys
import numpy as np
from cryosvi.io import star
from cryosvi.io.particles import read_particles, write_particles
star.LOOP_BLOCK_BYTES = 1 << 18  # many pieces at either size: what is held shows
particles = read_particles(sys.argv[1])
names = ["cryosviA", "cryosviB", "rlnAngleRot"]
write_particles(sys.argv[2], particles, added=names,
                values=lambda a, b: {n: np.arange(a, b) * (k + 0.5) for k, n in enumerate(names)})
print(re.search(r"^VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read(), re.M).group(1))
"""


def test_reading_and_writing_hold_a_few_numbers_per_particle(tmp_path):
    """read_particles then write_particles (3 columns set) of 2x10^4 and 2x10^5 rows
    of 12 columns, each in a process of its own: the peak resident memory grows by
    under 200 bytes per particle. Kept: 8 known numeric columns, the image and the
    optics group, 76 bytes; measured (2026-12-06) 155, the rest the heap's pieces
    between them; the whole table as pandas holds it, strings included, with the
    file's text, measured 379 bytes per particle."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    peaks = {}
    for count in (20_000, 200_000):
        path = tmp_path / f"p{count}.star"
        with open(path, "w") as handle:
            text = relion31_text(n=0)
            handle.write(text)
            rng = np.random.default_rng(0)
            for start in range(0, count, 10_000):
                numbers = rng.uniform(0, 1000, (10_000, 8))
                handle.write("".join(
                    f"{i % 5 + 1:06d}@Particles/s.mrcs Movies/m_{i // 40:06d}.mrc "
                    + " ".join(f"{v:.6f}" for v in row) + f" {i % 2 + 1} {i % 3 + 1}\n"
                    for i, row in zip(range(start, start + 10_000), numbers)))
        source = str(Path(__file__).resolve().parents[1] / "src")
        done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path),
                               str(tmp_path / f"out{count}.star")], capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": source})
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[count] = int(done.stdout.split()[-1]) * 1024
    per_particle = (peaks[200_000] - peaks[20_000]) / 180_000
    assert per_particle < 200, (peaks, per_particle)
