"""Import a script that is not in a package (a bench/ script, a test support file) as a module.

Standard library only: the GPU tests use it on machines that have the trainer's packages but not the
operator's (no kubernetes client)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_module_from_file(name: str, path: Path) -> ModuleType:
    """Import the file at `path` as module `name`, once: it is registered in sys.modules before it runs,
    because dataclasses look their module up there."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
