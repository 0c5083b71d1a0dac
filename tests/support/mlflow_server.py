"""A real `mlflow server` for the tracking tests (standard library only).

MLflow pins packages the trainer also uses, so it is installed in its own virtualenv:
`python -m venv ~/.cache/kubetune/mlflow-venv && ~/.cache/kubetune/mlflow-venv/bin/pip install mlflow`, or
KUBETUNE_MLFLOW_BIN names any `mlflow` executable. Without one the tests that need it skip, saying so."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

# scripts/bootstrap.sh installs it under its cache directory ($KUBETUNE_CACHE, default ~/.cache/kubetune).
CACHE_DIR = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
DEFAULT_BIN = CACHE_DIR / "mlflow-venv" / "bin" / "mlflow"
SKIP_REASON = ("no mlflow executable: install mlflow into its own virtualenv "
               "(python -m venv ~/.cache/kubetune/mlflow-venv && ~/.cache/kubetune/mlflow-venv/bin/pip install mlflow) "
               "or set KUBETUNE_MLFLOW_BIN")


def mlflow_bin() -> str | None:
    """The mlflow executable to run, or None."""
    for candidate in (os.environ.get("KUBETUNE_MLFLOW_BIN"), str(DEFAULT_BIN), shutil.which("mlflow")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(binary: str, root: Path, timeout: float = 120) -> Iterator[str]:
    """Start `mlflow server` (SQLite store, proxied artifacts under `root`) and yield its URL once /health answers."""
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([binary, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", str(root / "artifacts")],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline, last = time.time() + timeout, ""
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                        break
                except OSError as exc:
                    last = str(exc)
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s (exit "
                                       f"{proc.poll()}, last: {last}); log: {log_path.read_text()[-2000:]}")
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def get(url: str, path: str, **query: str) -> dict:
    """GET an MLflow REST endpoint and decode its JSON."""
    return json.loads(urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=10).read())
