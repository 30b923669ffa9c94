"""Framework integrations: trainstate checkpoints inside Lightning, Hugging Face Trainer and Accelerate.

Each submodule imports its framework when it is imported itself (``import trainstate`` never does):
``trainstate.integrations.lightning``, ``trainstate.integrations.transformers``,
``trainstate.integrations.accelerate``.
"""
