"""Tests import the top-level modules directly (`import unet`), so the repo root goes on sys.path."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
