"""`archlab scale`: which architecture wins as compute grows (a size ladder, fitted laws).

    settings.py  the study's protocol (ScaleSettings), the default ladder, checks, --resume
    ladder.py    the one dial (depth -> each architecture's shape, matched to dense's parameters),
                 token budgets from a tokens-per-parameter ratio, learning rates, checks
    plan.py      the runs (architecture x rung x seed) as compare's RunSpecs, trained one
                 process each through compare's runner, progress with a FLOP-weighted ETA
    fit.py       L(C) = E + A C^-alpha per architecture, bootstrap intervals, crossovers
    report.py    scale.md, results.json/csv, loss_vs_flops.png

Named apart from `bench scaling` (time and memory against sequence length, bench/scaling.py).
"""
