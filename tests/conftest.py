"""Test-session set-up: no network, transformers' common test mixins importable, our classes registered."""

import os
import sys
from pathlib import Path


# Tests never reach the Hub: every checkpoint is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

from _hf_common_tests import ensure_common_tests  # noqa: E402


ensure_common_tests()

import torch  # noqa: E402

import hf_msvit  # noqa: E402,F401  (registers the Auto classes)


# Tiny test models run fastest on one thread; with more, thread start-up dominates and any other load on the machine
# slows every op down by a large factor.
torch.set_num_threads(1)
