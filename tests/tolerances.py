"""The one dtype -> tolerance table of the test suite, used through torch.testing.assert_close.

Outputs are compared against torchvision or a float64 reference cast down. float32/float64 kernels
accumulate exactly like torchvision up to summation order; half types are within the rounding of the output
(float16 eps 2**-10, bfloat16 eps 2**-7), since the kernels accumulate in float32 and round once.
"""

import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw) -> None:
    """assert_close with the table's tolerance for ``dtype`` (default: ``actual``'s), in float64."""
    tol = {**TOLERANCES[dtype or actual.dtype], **kw}
    torch.testing.assert_close(actual.double(), expected.double(), **tol)
