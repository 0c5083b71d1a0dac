"""Test support: pytest fixtures and helpers for the test suite only (importable as `tests.support`).

Standard library only at import time: the GPU tests load `script_loader` on machines without the
operator's dependencies."""
