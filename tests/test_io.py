"""STAR and MRC round trips through the independent readers (starfile, mrcfile)."""

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.io.mrc import ParticleImages, StackWriter, parse_image_names
from cryosvi.io.star import optics_table, read_star, write_star


def write_dataset(directory, n=5, box=8, pixel_size=1.5):
    images = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    stack = StackWriter(directory / "stack.mrcs", n, box, pixel_size)
    stack.write(0, images[:2])
    stack.write(2, images[2:])
    np.testing.assert_array_equal(stack.read(1, 4), images[1:4])
    stack.close(images.min(), images.max(), images.mean(), images.std())
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnDefocusU": np.linspace(8000, 12000, n), "rlnOpticsGroup": np.ones(n, int),
    })
    optics = Optics(pixel_size=pixel_size, box=box)
    write_star(directory / "particles.star", particles, optics_table(optics))
    return images, particles, optics


def test_star_round_trip_through_starfile(tmp_path):
    _, particles, optics = write_dataset(tmp_path)
    raw = starfile.read(tmp_path / "particles.star", always_dict=True)
    assert set(raw) == {"optics", "particles"}
    np.testing.assert_allclose(raw["particles"]["rlnDefocusU"], particles["rlnDefocusU"])
    table = read_star(tmp_path / "particles.star")
    assert table.single_optics() == optics
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_stack_header_and_lazy_images(tmp_path):
    images, _, _ = write_dataset(tmp_path)
    with mrcfile.open(tmp_path / "stack.mrcs") as mrc:
        assert mrc.is_image_stack() and mrc.data.dtype == np.float32
        assert mrc.voxel_size.x == pytest.approx(1.5)
    lazy = ParticleImages(read_star(tmp_path / "particles.star"))
    assert len(lazy) == 5 and lazy.box == 8 and lazy.pixel_size == pytest.approx(1.5)
    np.testing.assert_array_equal(lazy[[4, 0, 2]], images[[4, 0, 2]])
    lazy.close()


def test_image_names_are_one_based():
    index, files = parse_image_names(["000001@a.mrcs", "12@dir/b.mrcs"])
    assert index.tolist() == [0, 11] and files.tolist() == ["a.mrcs", "dir/b.mrcs"]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "stack.mrcs").unlink(), "particle stack not found"),
    (lambda d: (d / "particles.star").write_text("not a star file\n"), "particles"),
])
def test_bad_datasets_give_clear_errors(tmp_path, break_it, message):
    write_dataset(tmp_path)
    break_it(tmp_path)
    with pytest.raises(CryosviError, match=message):
        ParticleImages(read_star(tmp_path / "particles.star"))


def test_nan_images_are_refused(tmp_path):
    write_dataset(tmp_path)
    with mrcfile.open(tmp_path / "stack.mrcs", mode="r+") as mrc:
        mrc.data[3, 2, 2] = np.nan
    lazy = ParticleImages(read_star(tmp_path / "particles.star"))
    with pytest.raises(CryosviError, match="particle 4 contains NaN"):
        lazy[np.arange(5)]


def test_image_number_past_the_stack_is_refused(tmp_path):
    _, particles, optics = write_dataset(tmp_path)
    particles.loc[0, "rlnImageName"] = "000009@stack.mrcs"
    write_star(tmp_path / "particles.star", particles, optics_table(optics))
    with pytest.raises(CryosviError, match="has 5 images"):
        ParticleImages(read_star(tmp_path / "particles.star"))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from cryosvi.io.atomic import save_npz_atomically, write_atomically

    path = tmp_path / "run.json"
    path.write_text("old")

    def failing(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(path, failing)
    assert path.read_text() == "old"
    save_npz_atomically(tmp_path / "arrays", x=np.arange(3))  # no .npz appended
    np.testing.assert_array_equal(np.load(tmp_path / "arrays")["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays", "run.json"]
