"""Importing this puts ``tests/distributed`` (the spawned ranks' code) on ``sys.path``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "distributed"))
