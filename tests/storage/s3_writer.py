"""A writer process for the object-store tests (killed with SIGKILL by them).

    python s3_writer.py race URL ENDPOINT VALUE        one-shot save(overwrite=False) of {"w": full(VALUE)}
    python s3_writer.py manager URL ENDPOINT [TIER]    manager: step 1 (small), then step 2 (multipart)

Prints one line per milestone (``ready``, ``saved N``) so the test knows where it is.
"""

from __future__ import annotations

import sys

import torch

import trainstate
from s3support import options
from trainstate.storage import ObjectStorage


def state(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(step)
    size = 8 if step == 1 else 3 << 20  # step 2: 12 MiB, several 5 MiB parts
    return {"w": torch.randn(size), "step": torch.tensor(step)}


def main() -> None:
    mode, url, endpoint = sys.argv[1:4]
    if mode == "race":
        value = float(sys.argv[4])
        print("ready", flush=True)
        sys.stdin.readline()  # every racer starts its save at once
        try:
            trainstate.save(
                url, {"w": torch.full((1 << 16,), value)}, overwrite=False, storage_options=options(endpoint)
            )
            print("won", flush=True)
        except trainstate.CheckpointExistsError as exc:
            print("lost", exc, flush=True)
        return
    storage = ObjectStorage(url, options(endpoint), part_size=5 << 20, concurrency=2, lease_ttl=2)
    if len(sys.argv) > 4:  # tiered: local directory, this storage remote
        manager = trainstate.CheckpointManager(sys.argv[4], remote=storage, keep_last=None)
    else:
        manager = trainstate.CheckpointManager(storage, keep_last=None)
    for step in (1, 2):
        manager.save(step, state(step))
        print("saved", step, flush=True)
    if len(sys.argv) > 4 and sys.argv[5:] == ["finish"]:
        manager.close()
        print("closed", flush=True)
        return
    sys.stdin.readline()  # killed here (or mid-upload) by the test


if __name__ == "__main__":
    main()
