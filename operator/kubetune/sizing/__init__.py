"""Torch-free VRAM estimator and GPU sizer for FineTuneJobs (see docs/sizing.md)."""
