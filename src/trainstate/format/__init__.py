"""The on-disk format: manifest, value codec, safetensors tensor files, hashing and validation.

Attributes are imported on first use: the manifest and header modules need no torch, so tools that
only read manifests (``trainstate ls``) never import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainstate._lazy import lazy_attributes

if TYPE_CHECKING:
    from trainstate.format.load_plan import LoadPlan, ReadItem, execute_load
    from trainstate.format.loader import MapLocation, TensorLoader
    from trainstate.format.manifest import FORMAT_VERSION, MANIFEST_NAME, FileEntry, Manifest
    from trainstate.format.reader import CheckpointReader
    from trainstate.format.writer import SavePlan, execute_save, plan_save

_WHERE = {
    **dict.fromkeys(("LoadPlan", "ReadItem", "execute_load"), "trainstate.format.load_plan"),
    **dict.fromkeys(("MapLocation", "TensorLoader"), "trainstate.format.loader"),
    **dict.fromkeys(("FORMAT_VERSION", "MANIFEST_NAME", "FileEntry", "Manifest"), "trainstate.format.manifest"),
    "CheckpointReader": "trainstate.format.reader",
    **dict.fromkeys(("SavePlan", "execute_save", "plan_save"), "trainstate.format.writer"),
}
__getattr__, __dir__ = lazy_attributes(globals(), _WHERE)

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
