"""The package itself: what `import lowbit` exposes and how it finds liblowbit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import lowbit


def test_public_names():
    for name in lowbit.__all__:
        assert hasattr(lowbit, name), name
    assert issubclass(lowbit.Shampoo, torch.optim.Optimizer)
    assert Path(lowbit.library_path).is_file()
    assert (Path(lowbit.__file__).parent / "py.typed").is_file()


def run_import(env_library: str):
    env = dict(os.environ, LOWBIT_LIBRARY=env_library)
    return subprocess.run([sys.executable, "-c", "import lowbit"], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_missing_library_is_a_clear_import_error(tmp_path):
    result = run_import(str(tmp_path / "nowhere.so"))
    assert result.returncode != 0
    assert "ImportError: lowbit: LOWBIT_LIBRARY=" in result.stderr and "does not name a file" in result.stderr


def test_a_broken_library_is_a_clear_import_error(tmp_path):
    bogus = tmp_path / "liblowbit.so"
    bogus.write_bytes(b"not an ELF file")
    result = run_import(str(bogus))
    assert result.returncode != 0
    assert "lowbit: could not load" in result.stderr and "must be built against the torch" in result.stderr
