"""Shared test setup: one thread per framework, so tests behave the same on 2 cores and in CI."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from indexer.compat import ensure_torchvision_importable  # noqa: E402

# Tests import transformers and torchvision directly, as users do after importing our modules.
ensure_torchvision_importable()
