"""`archlab compare`: every architecture trained under one protocol, then compared.

settings.py  CompareSettings: defaults, checks, the recipe, the table's learning rates
plan.py      the runs (architecture x seed x rate), their command lines, --resume state
runner.py    one `archlab train` subprocess per run: live progress, signal forwarding
loop.py      run_compare: plan -> run each -> collect -> outputs
outputs.py   collect the runs and write everything below
report.py    the table, winners (significance, minimum effects), report.md, results.*
"""
