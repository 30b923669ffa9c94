"""Peak resident memory of a block of code, for the benchmarks' "peak extra RSS" columns (Linux)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SAMPLE_INTERVAL_S = 0.002


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, writing "5" to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 64


@dataclass
class PeakRss:
    """RSS at entry and peak RSS inside the block, in kB; from VmHWM when it can be reset, else sampled."""

    baseline_kb: int = 0
    peak_kb: int = 0
    method: str = ""


@contextmanager
def peak_rss() -> Iterator[PeakRss]:
    result = PeakRss(baseline_kb=_status_kb("VmRSS"))
    if _reset_hwm():
        result.method = "VmHWM"
        yield result
        result.peak_kb = _status_kb("VmHWM")
        return
    result.method = f"VmRSS sampled every {SAMPLE_INTERVAL_S * 1e3:g} ms"
    stop = threading.Event()
    peak = [result.baseline_kb]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            time.sleep(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.peak_kb = max(peak[0], _status_kb("VmRSS"))
