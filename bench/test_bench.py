"""pytest-benchmark timings of every provider and mode on the GRoIE default case.

``pytest bench --benchmark-only``. With CUDA the case runs at full size and each call is synchronised.
Without CUDA it runs at the reduced size of the CPU parity run: ``loop`` and ``torchvision_msra`` time
torchvision's CPU ops, ``groie`` and ``groie_single`` the Triton interpreter (hundreds of times slower than a
compiled kernel: these numbers check the harness, they say nothing of GPU speed). ``extra_info`` carries the
cost model of the timed size.
"""

import pytest
import torch

from bench import cases, cost_model

CUDA = torch.cuda.is_available()
CASE = cases.DEFAULT_CASE


@pytest.fixture(scope="module")
def inputs():
    size = cases.full_size(CASE) if CUDA else cases.reduced_size(CASE)
    return cases.make_inputs(CASE, size, "cuda" if CUDA else "cpu")


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("provider", cases.PROVIDERS)
def test_roi_extraction(benchmark, inputs, provider, mode):
    cases.run_provider(provider, inputs)  # compile, autotune, infer the pooler's scales: not timed
    fn = cases.mode_callable(provider, inputs, mode)
    c = cost_model.cost(cases.problem(CASE, inputs.size), provider, mode)
    benchmark.group = f"{CASE.name} {mode}"
    benchmark.extra_info.update(
        case=CASE.name,
        size=inputs.size.describe(),
        provider=provider,
        mode=mode,
        modeled_bytes=c.bytes,
        modeled_sector_bytes=c.sector_bytes,
        launches=c.launches,
        device="cuda" if CUDA else "cpu",
    )
    if CUDA:

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    elif provider.startswith("groie"):
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)  # interpreted: seconds per call
    else:
        benchmark(fn)
