"""Test set-up: every Triton kernel runs under the interpreter on CPU tensors (there is no GPU here)."""

import os

# Must be set before triton is imported anywhere: triton.jit reads it at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")
