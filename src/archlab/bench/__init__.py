"""Benchmarks and the fair comparison: one folder per job, what they share in ``common/``.

compare/        `archlab compare`
recall/         `archlab bench recall`
lengths/        `archlab bench lengths` (alias: `bench scaling`)
decode/         `archlab bench generate`
eval/           `archlab eval`
scaling_laws/   `archlab scale`
common/         results, statistics, plots, reference baselines, hardware, flag parsing
"""
