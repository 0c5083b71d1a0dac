"""Where the pinned control-plane binaries are (built by devcluster/build.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .fleet import REPO_ROOT

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
BUILD_SCRIPT = REPO_ROOT / "devcluster" / "build.sh"


def _cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def missing_binaries(bin_dir: Path) -> list[str]:
    """Component binaries not present (or not executable) in bin_dir."""
    return [c for c in COMPONENTS if not os.access(bin_dir / c, os.X_OK)]


def find_bin_dir(build: bool = False) -> Path:
    """$KUBETUNE_BIN_DIR, else ~/.cache/kubetune/bin/current; with build=True run build.sh (reuses a
    complete build, rebuilds when the pins changed) and use the directory it prints."""
    if build:
        out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
        return Path(out.strip().splitlines()[-1])
    env = os.environ.get("KUBETUNE_BIN_DIR")
    bin_dir = Path(env) if env else _cache_dir() / "bin" / "current"
    missing = missing_binaries(bin_dir)
    if missing:
        raise FileNotFoundError(f"control-plane binaries {missing} not found in {bin_dir}: run devcluster/build.sh "
                                "(or scripts/bootstrap.sh) or set KUBETUNE_BIN_DIR")
    return bin_dir


def helm_binary() -> str | None:
    """helm from $KUBETUNE_BIN_DIR, ~/.cache/kubetune/bin/current or PATH (None when there is none)."""
    import shutil

    dirs = [os.environ.get("KUBETUNE_BIN_DIR", ""), str(_cache_dir() / "bin" / "current")]
    for d in filter(None, dirs):
        if os.access(Path(d) / "helm", os.X_OK):
            return str(Path(d) / "helm")
    return shutil.which("helm")
