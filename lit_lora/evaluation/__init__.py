"""Measuring what finetuning did.

    evaluate.py       perplexity of a text file and lm-evaluation-harness tasks, as scripts/evaluate.py runs them
    lm_eval_model.py  a lit-lora model inside EleutherAI's lm-evaluation-harness
    compare.py        the method comparison: the same model and data finetuned by each method, scored, tabled, plotted
    synthetic.py      the quickstart's synthetic instruction world and its tiny pretrained base

May import: the teaching files, `lit_lora.files`, `lit_lora.speed`. Nothing below imports this package.
"""
