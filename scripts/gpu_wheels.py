"""Gather, here, the Python packages the GPU checks need that the device machine's image lacks.

    ~/.cache/kubetune/venv/bin/python scripts/gpu_wheels.py [--dest .whl] [--check-only]

The device machine (see scripts/gpu-checks.sh) runs Python 3.12 with PyTorch, transformers, accelerate
and many other packages preinstalled, and can fetch nothing. This downloads, for CPython 3.12 on
manylinux x86-64, the trainer's pinned packages it lacks (bitsandbytes, datasets, peft, liger-kernel,
pydantic, torch-optimi, DeepSpeed as a source archive) and then, until nothing is missing, every
requirement of those that is neither downloaded nor in the image: pip installs them there with --no-deps, so a missing one
would only show as an ImportError on the GPU, in device time. It fails when something cannot be found or
when the wheels and the working tree would not fit the 64 MiB a device call carries.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 1024 * 1024

# The device image's Python packages (the tool library's device/KINDS.md, "Python packages already
# there", as read on 2026-11-17). Versions are not listed there; pins that matter are carried anyway.
DEVICE_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split()

# Versions of image packages seen there (KINDS.md's pip list, 2026-11): requirements of the carried
# packages are checked against them. Others' versions are unknown here: gpu-checks.sh's `env` step
# imports everything and runs `pip check` there first.
DEVICE_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
                   "safetensors": "0.8.0", "tokenizers": "0.23.2", "numpy": "2.5.2", "triton": "3.6.0"}

# What the GPU checks import that the image lacks, or has at a version that may differ from our pin
# (peft): pinned as in trainer_image/requirements.txt and pyproject.toml. torch-optimi: the trainer's
# Kahan-summed optimizers for bf16 full fine-tuning (kubetune_trainer.optim), its only requirement is torch.
CARRY_PINNED = ("bitsandbytes", "datasets", "peft", "liger-kernel", "pydantic", "torch-optimi")
# Trainer requirements the GPU checks never import, so they are not carried (tests/unit/test_gpu_wheels.py
# checks every requirement of the trainer extra is in the image, carried, or named here with its reason).
NOT_CARRIED = {"minio": "S3 storage client, imported only for s3:// URIs; the GPU checks use local files",
               "rouge-score": "post-training evaluation metric (kubetune_trainer.evaluation), CPU-only; the GPU "
                              "checks do not evaluate",
               "gguf": "GGUF export writer (kubetune_trainer.export), CPU-only; the GPU checks do not export",
               "wandb": "Weights & Biases client (kubetune_trainer.tracking_wandb), imported only for "
                        "spec.tracking.wandb; the GPU checks do not track, and its 20 MB wheel would not fit "
                        "beside bitsandbytes"}
SOURCE_ONLY = {"deepspeed"}  # no wheel on the index: carried as its source archive, built there
EXTRA_PINS = ("deepspeed==0.19.8",)
# transformers is in the image (5.17 when last read) and too large (13 MB) to carry beside
# bitsandbytes (43 MB) within 64 MiB: the checks run on the image's; gpu-checks.sh records its version.

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
DEVICE_MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                  "os_name": "posix"}


def pins_from_requirements(path: Path) -> dict[str, str]:
    """name -> requirement line, for `name==version` lines of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = line
    return pins


def dist_name(path: Path) -> str:
    """Canonical project name of a wheel or sdist file name."""
    stem = path.name
    stem = stem[:-len(".tar.gz")] if stem.endswith(".tar.gz") else stem.rsplit(".", 1)[0]
    return canonicalize_name(re.split(r"-(?=\d)", stem, maxsplit=1)[0])


def requirements_of(path: Path) -> list[Requirement]:
    """The Requires-Dist of a wheel or sdist (PKG-INFO) that apply on the device, extras left out."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
    else:
        with tarfile.open(path) as t:
            member = next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
            text = t.extractfile(member).read().decode()
    reqs = []
    for line in Parser().parsestr(text).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**DEVICE_MARKERS, "extra": ""}):
            reqs.append(req)
    return reqs


def carried_files(dest: Path) -> dict[str, Path]:
    """project name -> wheel or source archive in `dest`."""
    return {dist_name(p): p for p in dest.iterdir() if p.suffix == ".whl" or p.name.endswith(".tar.gz")}


def missing_requirements(dest: Path) -> dict[str, Requirement]:
    """Requirements of the carried packages that are neither carried nor in the device image."""
    carried = carried_files(dest)
    have = set(carried) | {canonicalize_name(n) for n in DEVICE_HAS}
    missing: dict[str, Requirement] = {}
    for path in carried.values():
        for req in requirements_of(path):
            name = canonicalize_name(req.name)
            if name not in have:
                missing.setdefault(name, req)
    return missing


def version_conflicts(dest: Path) -> list[str]:
    """Requirements of carried packages that the image's known versions do not satisfy."""
    carried = carried_files(dest)
    conflicts = []
    for name, path in sorted(carried.items()):
        for req in requirements_of(path):
            dep = canonicalize_name(req.name)
            if dep in DEVICE_VERSIONS and dep not in carried and not req.specifier.contains(DEVICE_VERSIONS[dep],
                                                                                            prereleases=True):
                conflicts.append(f"{name} needs {req}, the image has {dep} {DEVICE_VERSIONS[dep]}")
    return conflicts


def download(spec: str, dest: Path, source: bool = False) -> None:
    """pip download one distribution for the device (no dependencies: those are resolved here)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    if source:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    cmd.append(spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_wheels: cannot download {spec}: {proc.stderr.strip()[-500:]}")


def tree_bytes() -> int:
    """Bytes of the working tree a device call sends (tracked and untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=REPO / ".whl")
    p.add_argument("--check-only", action="store_true", help="check what is in --dest, download nothing")
    args = p.parse_args(argv)
    dest = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        pins = pins_from_requirements(REPO / "trainer_image" / "requirements.txt")
        for name in CARRY_PINNED:
            download(pins[canonicalize_name(name)], dest)
        for spec in EXTRA_PINS:
            download(spec, dest, source=canonicalize_name(Requirement(spec).name) in SOURCE_ONLY)
        for _ in range(10):  # requirements of requirements
            missing = missing_requirements(dest)
            if not missing:
                break
            for name, req in sorted(missing.items()):
                print(f"gpu_wheels: {name} ({req}) is not in the device image: carrying it")
                download(f"{name}{req.specifier}", dest)
    missing = missing_requirements(dest)
    if missing:
        print("gpu_wheels: still missing on the device: " + ", ".join(map(str, missing.values())), file=sys.stderr)
        return 1
    conflicts = version_conflicts(dest)
    if conflicts:
        print("gpu_wheels: " + "; ".join(conflicts), file=sys.stderr)
        return 1
    wheels = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    tree = tree_bytes()
    total = wheels + tree
    print(f"gpu_wheels: {len(list(dest.iterdir()))} files, {wheels / 2**20:.1f} MiB, plus the working tree "
          f"{tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries")
    for f in sorted(dest.iterdir()):
        print(f"  {f.name}  {f.stat().st_size / 2**20:.1f} MiB")
    if total > CARRY_LIMIT:
        print("gpu_wheels: too large to carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
