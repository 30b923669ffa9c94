"""Convert foreign checkpoints to trainstate checkpoints, and trainstate checkpoints to ``torch.save`` files.

Sources: a ``torch.save`` file (``.pt``/``.pth``/``.bin``), a PyTorch Lightning ``.ckpt``, a Hugging
Face ``Trainer`` checkpoint directory, and a ``torch.distributed.checkpoint`` (DCP) directory.
A checkpoint is untrusted input: every pickle is read with ``torch.load(weights_only=True)`` plus a
short allowlist of harmless types (numpy arrays and scalars, ``argparse.Namespace``, Lightning's
``AttributeDict``, paths), and DCP's pickled ``.metadata`` with an unpickler that only builds DCP's
own metadata classes. Full unpickling, which runs code from the file, needs ``trust_pickle=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainstate._lazy import lazy_attributes
from trainstate.convert.kinds import SOURCE_KINDS, TORCH_SUFFIXES

if TYPE_CHECKING:
    from trainstate.convert.common import ReadOptions, Source, SourceFormat
    from trainstate.convert.conversions import FORMATS, detect_source, read_source, to_torch_file, to_trainstate
    from trainstate.convert.unpickle import load_torch_file

# Imported on first use: the names of the kinds (for the CLI's help) need no torch, reading does.
_WHERE = {
    **dict.fromkeys(("ReadOptions", "Source", "SourceFormat"), "trainstate.convert.common"),
    **dict.fromkeys(
        ("FORMATS", "detect_source", "read_source", "to_torch_file", "to_trainstate"), "trainstate.convert.conversions"
    ),
    "load_torch_file": "trainstate.convert.unpickle",
}
__getattr__, __dir__ = lazy_attributes(globals(), _WHERE)

__all__ = [
    "SOURCE_KINDS",
    "TORCH_SUFFIXES",
    "FORMATS",
    "ReadOptions",
    "Source",
    "SourceFormat",
    "detect_source",
    "load_torch_file",
    "read_source",
    "to_torch_file",
    "to_trainstate",
]
