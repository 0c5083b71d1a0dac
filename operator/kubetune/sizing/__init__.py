"""Torch-free VRAM estimator and GPU sizer for FineTuneJobs (formulas in docs/sizing.md).

Public API (docs/contracts.md §8): `fleet_from_nodes`, `size_job`, `apply_spec_defaults`,
plus the estimator building blocks for the CLI and tests.
"""

from .architecture import Architecture, ArchitectureError, architecture_from_config
from .catalog import catalog_names, load_catalog, lookup_catalog, resolve_architecture
from .defaults import apply_spec_defaults, setup_from_spec
from .estimator import MemoryEstimate, Parallelism, TrainingSetup, estimate_memory
from .fleet import Fleet, GpuPool, fleet_from_nodes, nodes_from_file, parse_gpu_shorthand
from .sizer import SizingDecision, size_job

__all__ = [
    "Architecture", "ArchitectureError", "architecture_from_config", "catalog_names", "load_catalog",
    "lookup_catalog", "resolve_architecture", "apply_spec_defaults", "setup_from_spec", "MemoryEstimate",
    "Parallelism", "TrainingSetup", "estimate_memory", "Fleet", "GpuPool", "fleet_from_nodes",
    "nodes_from_file", "parse_gpu_shorthand", "SizingDecision", "size_job",
]
