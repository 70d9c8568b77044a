"""Shared fixtures. Tests run under pytest-xdist with two workers: one torch thread each."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
