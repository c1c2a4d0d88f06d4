"""Finds and loads liblowbit, the C++ library that registers torch.ops.lowbit and
torch.classes.lowbit. Looked for, in order:

1. the path in the environment variable ``LOWBIT_LIBRARY``;
2. the copy installed inside this package by ``pip install`` (``lowbit/liblowbit.so``);
3. ``build/liblowbit.so`` of the source checkout this package sits in (``python/lowbit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch

ENV_VAR = "LOWBIT_LIBRARY"

_loaded: Optional[str] = None


def _candidates() -> List[Path]:
    here = Path(__file__).resolve().parent
    installed = sorted(here.glob("liblowbit*.so*")) + sorted(here.glob("liblowbit*.dylib"))
    checkout = here.parent.parent / "build" / "liblowbit.so"
    return installed + [checkout]


def _already_registered() -> bool:
    try:
        torch.ops.lowbit.shampoo_step  # noqa: B018 - resolving the op is the test
        return True
    except (AttributeError, RuntimeError):
        return False


def load() -> str:
    """Loads liblowbit once and returns the path it was loaded from."""
    global _loaded
    if _loaded is not None:
        return _loaded
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ImportError(f"lowbit: {ENV_VAR}={explicit!r} does not name a file")
    else:
        path = next((p for p in _candidates() if p.is_file()), None)  # type: ignore[assignment]
        if path is None:
            searched = ", ".join(str(p) for p in _candidates())
            raise ImportError(
                "lowbit: the C++ library liblowbit was not found (searched: " + searched + "). "
                "Install the package with `python3 -m pip install --no-build-isolation .` from the "
                "lowbit repository, build it with `bash scripts/setup.sh`, or set "
                f"{ENV_VAR} to the path of liblowbit.so."
            )
    if _already_registered():
        # Another copy registered the ops already (loading a second one would clash).
        _loaded = str(path)
        return _loaded
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise ImportError(
            f"lowbit: could not load {path}: {e}. liblowbit must be built against the torch "
            f"that is imported here (torch {torch.__version__} from {Path(torch.__file__).parent}); "
            "rebuild it, or reinstall the package with `python3 -m pip install --no-build-isolation .`."
        ) from e
    _loaded = str(path)
    return _loaded
