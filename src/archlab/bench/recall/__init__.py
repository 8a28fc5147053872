"""`archlab bench recall`: associative recall (MQAR) or selective copying per architecture x
width x pairs, 2-layer models, the best learning rate per cell.

    settings.py  RecallSettings: the grid and its checks
    tasks.py     the generated examples and answer accuracy
    worker.py    one run in its own process (``python -m archlab.bench.recall.worker RUN``)
    loop.py      the grid: plan, run each, resume
    report.py    tables, figures, recall.json / recall.md
"""
