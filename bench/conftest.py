"""pytest set-up for the benchmark tests (``pytest bench --benchmark-only``)."""

import os

import torch  # imports no triton

if not torch.cuda.is_available():
    # The kernels run under the Triton interpreter on CPU; it must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
