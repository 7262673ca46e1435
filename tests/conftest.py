"""Suite-wide settings. The toy models live in `tests/models.py`."""

from __future__ import annotations

import torch

# Every tensor in these tests is tiny: thread start-up costs more than the maths (10-100x on small CPUs).
torch.set_num_threads(1)
