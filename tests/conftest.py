"""Tiny models run fastest single-threaded; two threads on a 2-core machine only add contention."""
import torch

torch.set_num_threads(1)
