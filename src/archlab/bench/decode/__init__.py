"""`archlab bench generate`: per-token decoding latency and decode state against context.

measure.py  the sweep, its table, figure and outputs
"""
