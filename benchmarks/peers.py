"""Peers the benchmarks compare against, set up the same way in every benchmark."""

from __future__ import annotations

from typing import Any


def torch_checkpointing_manager(*, sync: bool) -> Any:
    """Meta's ``torch_checkpointing.CheckpointManager``, sync or async (staging into shared memory, a
    background writer process). ``use_direct_io=False``: its O_DIRECT writes fail with EINVAL on this
    VM's ext4. It does not fsync; its async save is durable once the returned future is done."""
    import torch_checkpointing as tc
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    saver = tc.SyncCheckpointSaverConfig() if sync else tc.AsyncCheckpointSaverConfig()
    storage = LocalFileSystemStorageConfig(use_direct_io=False)
    return tc.CheckpointManager(tc.CheckpointManager.Config(save=saver, storage_config=storage))
