"""The on-disk format: manifest, value codec, safetensors tensor files, hashing and validation."""

from __future__ import annotations

from trainstate.format.load_plan import LoadPlan, ReadItem, execute_load
from trainstate.format.manifest import FORMAT_VERSION, MANIFEST_NAME, FileEntry, Manifest
from trainstate.format.reader import CheckpointReader, MapLocation, TensorLoader
from trainstate.format.writer import SavePlan, execute_save, plan_save

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CheckpointReader",
    "FileEntry",
    "LoadPlan",
    "ReadItem",
    "Manifest",
    "MapLocation",
    "TensorLoader",
    "SavePlan",
    "execute_load",
    "execute_save",
    "plan_save",
]
