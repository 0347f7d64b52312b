"""groie-triton's benchmark suite: ``python -m bench`` (:mod:`bench.cli`), ``pytest bench --benchmark-only``.

Modules: :mod:`bench.cases` (sweep, inputs, providers, parity), :mod:`bench.cost_model` (modelled DRAM bytes and
32-byte sectors, launches, roofline), :mod:`bench.runner` (the sweep into records), :mod:`bench.report`
(tables, default-case summary, compile summary, targets, plot), :mod:`bench.cli` (the command line). Importing
this package imports neither torch nor triton, so that ``python -m bench`` can switch the Triton interpreter on
first where there is no GPU.
"""
