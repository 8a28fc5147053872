"""`archlab eval`: a checkpoint on held-out data, and on lm-eval tasks.

evaluate.py         validation loss, perplexity, bits per byte, MQAR accuracy
lm_eval_adapter.py  the model as an lm-eval ``LM``
lm_eval_tasks.py    loading and running lm-eval tasks (``--tasks``)
"""
