"""What the bench jobs share.

results.py    reading run folders, aggregating over seeds
stats.py      confidence intervals, Welch's test and the minimum effect
plots.py      matplotlib figures (Agg), the architectures' fixed colours
reference.py  the data's reference baselines (unigram/bigram entropy, bytes per token)
hardware.py   what machine ran it
options.py    parsing the list flags every bench takes (architectures, sizes, rates)
"""
