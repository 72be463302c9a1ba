"""The command line's contract: a warning about the input is one ``warning:`` line."""

from __future__ import annotations

import warnings

from cryosvi.cli.main import main
from particle_files import write_relion30


def test_input_warnings_are_one_line_each(tmp_path, capsys):
    path = write_relion30(tmp_path)  # no rlnAmplitudeContrast: defaulted with a warning
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if "warning:" in line]
    assert warned and all(line.startswith("cryosvi inspect: warning: ") for line in warned)
    assert any("amplitude contrast" in line for line in warned)
    assert not any(".py:" in line for line in lines)  # not Python's file:line format


def test_the_warning_hook_is_restored(tmp_path):
    before = warnings.showwarning
    main(["inspect", str(write_relion30(tmp_path))])
    assert warnings.showwarning is before


def test_threads_are_the_callers_again_after_a_command(tmp_path):
    # --threads applies to the command; main() called in-process (scripts, tests) must
    # give the caller its own thread count back, even when the command fails.
    import torch

    before = torch.get_num_threads()
    code = main(["learn-modes", "--particles", str(tmp_path / "missing.star"),
                 "--structure", str(tmp_path / "missing.pdb"), "-o", str(tmp_path / "x.npz"),
                 "--threads", str(before + 3)])
    assert code == 2
    assert torch.get_num_threads() == before
