"""kubetune.memory_trace: `--trace-memory` reports what grew between two SIGUSR2s, by traceback."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from kubetune.main import build_parser
from kubetune.memory_trace import MemoryTrace

pytestmark = pytest.mark.unit


def _grow(kept: list) -> None:
    kept.extend(bytearray(10_000) for _ in range(1_000))  # ~10 MB, all from this line


def test_the_second_dump_names_the_line_that_grew_and_by_how_much():
    trace = MemoryTrace(frames=3, top=5)
    trace.start()
    kept: list = []
    try:
        first = trace.dump()
        assert first.startswith("traced ") and "largest" in first
        _grow(kept)
        second = trace.dump()
    finally:
        trace.stop()
    assert "grew most since the last dump" in second
    head, frames = second.splitlines()[1], second.splitlines()[2:5]
    grew = float(head.split("(")[1].split(")")[0])
    assert 9.0 < grew < 11.0, head
    assert any(f"{__file__}:" in line for line in frames), second


def test_sigusr2_dumps_off_the_event_loop():
    trace = MemoryTrace(frames=1, top=1)
    dumped = []
    trace.dump = lambda: dumped.append(True) or "report"  # type: ignore[method-assign]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        trace.install(loop)
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(100):
                if dumped:
                    return
                await asyncio.sleep(0.02)
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)

    asyncio.run(main())
    assert dumped == [True]


def test_off_unless_asked():
    assert build_parser().parse_args([]).trace_memory == 0
    assert build_parser().parse_args(["--trace-memory", "10"]).trace_memory == 10
