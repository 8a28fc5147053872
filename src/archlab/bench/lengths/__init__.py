"""`archlab bench lengths` (formerly `bench scaling`, still accepted): forward and
forward+backward time and peak memory against the sequence length T.

    measure.py  the sweep (one fresh process per memory point:
                ``python -m archlab.bench.lengths.measure SPEC``)
    report.py   exponents of time ~ T^p, crossovers against dense, scaling.json/md/png
"""
