"""STAR and MRC readers and writers against independent ones (starfile, mrcfile), and
property tests of the STAR, MRC and .cs readers on damaged bytes and values: a
CryosviError or finite output, never another exception."""

import io
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryosvi.config import Optics
from cryosvi.errors import CryosviError
from cryosvi.io.mrc import StackWriter, open_stack, parse_image_names
from cryosvi.io.particles import read_particles
from cryosvi.io.star import optics_table, read_star_blocks, write_star
from particle_files import cs_array, write_relion31, write_stack


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


def test_star_writer_read_by_starfile_and_back(tmp_path):
    _, particles, optics = write_dataset(tmp_path)
    raw = starfile.read(tmp_path / "particles.star", always_dict=True)
    assert set(raw) == {"optics", "particles"}
    np.testing.assert_allclose(raw["particles"]["rlnDefocusU"], particles["rlnDefocusU"])
    ps = read_particles(tmp_path / "particles.star")
    assert ps.optics["rlnImagePixelSize"].tolist() == [optics.pixel_size]
    np.testing.assert_array_equal(ps.metadata["rlnDefocusU"], raw["particles"]["rlnDefocusU"])
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_stack_header_and_lazy_images(tmp_path):
    images, _, _ = write_dataset(tmp_path)
    with mrcfile.open(tmp_path / "stack.mrcs") as mrc:
        assert mrc.is_image_stack() and mrc.data.dtype == np.float32
        assert mrc.voxel_size.x == pytest.approx(1.5)
    stack = open_stack(tmp_path / "stack.mrcs")
    assert stack.count == 5 and stack.box == 8 and stack.pixel_size == pytest.approx(1.5)
    ps = read_particles(tmp_path / "particles.star")
    np.testing.assert_array_equal(ps.images([4, 0, 2]), images[[4, 0, 2]])


@pytest.mark.parametrize("dtype, mode", [(np.int8, 0), (np.int16, 1), (np.float16, 12),
                                         (np.uint16, 6)])
def test_every_real_mode_reads_as_float32(tmp_path, dtype, mode):
    data = np.arange(2 * 8 * 8).reshape(2, 8, 8).astype(dtype)
    with mrcfile.new(tmp_path / "s.mrcs") as mrc:
        mrc.set_data(data)
    stack = open_stack(tmp_path / "s.mrcs")
    assert int(mrcfile.open(tmp_path / "s.mrcs").header.mode) == mode
    np.testing.assert_array_equal(stack.data, data)


def test_a_mode_that_disagrees_with_the_file_size_is_refused(tmp_path):
    write_stack(tmp_path / "s.mrcs", n=3)
    with mrcfile.mmap(tmp_path / "s.mrcs", mode="r+", permissive=True) as mrc:
        mrc.header.mode = 0  # float32 data labelled int8: 4x the images if believed
    with pytest.raises(CryosviError, match=r"mode 0 \(int8\), 192 bytes.*768 bytes"):
        open_stack(tmp_path / "s.mrcs")


def test_image_names_with_any_padding():
    index, files = parse_image_names(["000001@a.mrcs", "12@dir/b.mrcs", "single.mrc"])
    assert index.tolist() == [0, 11, -1]  # -1: the file's only image
    assert files.tolist() == ["a.mrcs", "dir/b.mrcs", "single.mrc"]
    for bad in ("0@a.mrcs", "x@a.mrcs", "1.5@a.mrcs"):
        with pytest.raises(CryosviError, match="rlnImageName"):
            parse_image_names([bad])


def test_star_blocks_naming_lines(tmp_path):
    path = tmp_path / "k.star"
    path.write_text("data_general\n_rlnImageSize 64\n_rlnVoltage 300\n\n"
                    "data_x\nloop_\n_a\n_b\n1 2\n# a comment\n3 4\n")
    blocks = read_star_blocks(path)
    assert blocks["general"].table.to_dict("records") == [{"rlnImageSize": 64,
                                                          "rlnVoltage": 300}]
    assert blocks["x"].table.to_numpy().tolist() == [[1, 2], [3, 4]]
    assert blocks["x"].lines.tolist() == [9, 11]
    path.write_text("data_x\nloop_\n_a\n_b\n1 2\n3\n")
    with pytest.raises(CryosviError, match="line 6: row cut short: 1 values"):
        read_star_blocks(path)


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


# ------------------------------------------------------------------- property tests
def read_everything(path):
    """Metadata and every image of ``path``; the numbers that come out must be finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = read_particles(path)
        numeric = ps.metadata.select_dtypes("number").to_numpy(float)
        assert np.isfinite(numeric).all()
        if "rlnImageName" in ps.metadata:
            images = ps.images(np.arange(len(ps)))
            assert images.dtype == np.float32 and np.isfinite(images).all()


PROPERTY = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    write_relion31(directory)
    return directory


def damaged(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for kind, position, value in edits:
        position = position % max(len(data), 1)
        if kind == 0:
            data[position:position + 1] = bytes([value])
        elif kind == 1:
            del data[position:]
        else:
            data[position:position] = bytes([value])
    return bytes(data)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)),
                 min_size=1, max_size=4)


@PROPERTY
@given(edits=EDITS)
def test_damaged_star_gives_a_cryosvi_error_or_finite_output(good, tmp_path, edits):
    text = (good / "particles.star").read_bytes()
    path = tmp_path / "particles.star"
    path.write_bytes(damaged(text, edits))
    for stack in ("a.mrcs", "b.mrcs"):
        (tmp_path / stack).write_bytes((good / stack).read_bytes())
    try:
        read_everything(path)
    except CryosviError as error:
        assert "\n" not in str(error)


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["abc", "-300", "1.5", "0", "1e400", "-1", "'x'"]))


@PROPERTY
@given(column=st.sampled_from(["_rlnVoltage", "_rlnAmplitudeContrast", "_rlnImageSize",
                               "_rlnImagePixelSize", "_rlnSphericalAberration",
                               "_rlnDefocusU", "_rlnAngleTilt", "_rlnOpticsGroup"]),
       value=NUMBERS)
def test_nonsense_numbers_in_star_columns(good, tmp_path, column, value):
    """Replace the first value of ``column`` (in the optics or particles table)."""
    lines = (good / "particles.star").read_text().splitlines()
    block_labels, labels, target = [], [], None
    for i, line in enumerate(lines):
        if line.startswith("loop_"):
            labels = []
        elif line.startswith("_"):
            labels.append(line.split()[0])
        elif labels and line.strip() and column in labels and target is None:
            target = (i, labels.index(column))
    del block_labels
    row, position = target
    values = lines[row].split()
    values[position] = str(value)
    lines[row] = " ".join(values)
    (tmp_path / "particles.star").write_text("\n".join(lines) + "\n")
    for stack in ("a.mrcs", "b.mrcs"):
        (tmp_path / stack).write_bytes((good / stack).read_bytes())
    try:
        read_everything(tmp_path / "particles.star")
    except CryosviError as error:
        assert "\n" not in str(error)


@PROPERTY
@given(edits=EDITS, header_only=st.booleans())
def test_damaged_mrc_gives_a_cryosvi_error_or_finite_images(good, tmp_path, edits,
                                                             header_only):
    data = (good / "a.mrcs").read_bytes()
    if header_only:  # aim at the 1024-byte header
        edits = [(k, p % 1024, v) for k, p, v in edits]
    (tmp_path / "a.mrcs").write_bytes(damaged(data, edits))
    (tmp_path / "b.mrcs").write_bytes((good / "b.mrcs").read_bytes())
    (tmp_path / "particles.star").write_bytes((good / "particles.star").read_bytes())
    try:
        read_everything(tmp_path / "particles.star")
    except CryosviError as error:
        assert "\n" not in str(error)


@PROPERTY
@given(field=st.sampled_from(["blob/idx", "blob/psize_A", "ctf/accel_kv", "ctf/cs_mm",
                              "ctf/amp_contrast", "ctf/df1_A", "alignments3D/pose",
                              "alignments3D/shift", "blob/shape"]),
       value=st.floats(allow_nan=True, allow_infinity=True, width=32),
       edits=st.one_of(st.none(), EDITS))
def test_damaged_cs_gives_a_cryosvi_error_or_finite_output(tmp_path, field, value, edits):
    array = cs_array(3, stack="s.mrcs")
    kind = array.dtype[field].base.kind
    if kind in "ui" and not (np.isfinite(value) and 0 <= value < 2**31):
        value = 0
    array[field][1] = value
    write_stack(tmp_path / "s.mrcs", n=3)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue() if edits is None else damaged(buffer.getvalue(), edits)
    (tmp_path / "p.cs").write_bytes(data)
    try:
        read_everything(tmp_path / "p.cs")
    except CryosviError as error:
        assert "\n" not in str(error)
