"""Tests import the top-level modules directly (`import unet`), so the repo root goes on sys.path."""
import os
import sys

# The test models are small: one thread per process is faster than two fighting over the cores,
# and subprocesses (DDP, the CLI) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
