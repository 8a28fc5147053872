"""Benchmarks and the fair comparison: `archlab compare`, `archlab bench`, `archlab eval`.

Modules: ``hardware`` (what machine ran it), ``compare`` (protocol and subprocess runner),
``report`` (table, winners, report.md, results.json/csv), ``plots`` (matplotlib, Agg),
``scaling`` (time/memory against sequence length), ``decode_bench`` (per-token decoding),
``evaluate`` (validation loss, perplexity, bits per byte, MQAR accuracy).
"""
