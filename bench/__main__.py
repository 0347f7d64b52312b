"""``python -m bench``: see :mod:`bench.cli`.

Without CUDA the kernels run under the Triton interpreter, which must be on before triton is first imported
(``@triton.jit`` reads it when a kernel is defined), so it is set here before anything imports triton.
"""

import os
import sys

import torch  # imports no triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
