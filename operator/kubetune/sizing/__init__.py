"""Sizing: the torch-free VRAM estimator, the model catalog, the GPU fleet, the sizer and the layout it yields.

One home for everything that turns a typed FineTuneJob spec into a compute layout (formulas in
docs/sizing.md, API in docs/contracts.md §8):

- `estimator`, `params`, `architecture`, `catalog`: per-GPU memory of a model and training setup;
- `training_setup`: the estimator's TrainingSetup read from the typed spec;
- `fleet`: GPU pools from the cluster's Node objects;
- `sizer`: `size_job(spec, fleet) -> SizingDecision`, the layout search and its suggestions;
- `layout`: `Layout`, `SizingOutcome`, `size_job_layout(spec, nodes)`, the layout pinned by spec.resources;
- `fleet_sizer`: `FleetSizer.size(spec)`, sizing against a node snapshot shared by a burst of jobs;
- `cli`: `kubetune estimate`.
"""

from .architecture import Architecture, ArchitectureError, architecture_from_config
from .catalog import catalog_names, load_catalog, lookup_catalog, resolve_architecture
from .estimator import MemoryEstimate, Parallelism, TrainingSetup, estimate_memory
from .fleet import Fleet, GpuPool, fleet_from_nodes, nodes_from_file, parse_gpu_shorthand
from .fleet_sizer import FleetSizer, sizing_key
from .layout import (Layout, SizingOutcome, describe, layout_from_decision, layout_from_resources,
                     resolve_strategy, size_job_layout)
from .sizer import SizingDecision, apply_patch, size_job
from .training_setup import resolve_precision, setup_from_spec

__all__ = [
    "Architecture", "ArchitectureError", "architecture_from_config", "catalog_names", "load_catalog",
    "lookup_catalog", "resolve_architecture", "MemoryEstimate", "Parallelism", "TrainingSetup", "estimate_memory",
    "Fleet", "GpuPool", "fleet_from_nodes", "nodes_from_file", "parse_gpu_shorthand", "FleetSizer", "sizing_key",
    "Layout", "SizingOutcome", "describe", "layout_from_decision", "layout_from_resources", "resolve_strategy",
    "size_job_layout", "SizingDecision", "apply_patch", "size_job", "resolve_precision", "setup_from_spec",
]
