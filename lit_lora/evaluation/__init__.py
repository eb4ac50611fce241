"""Measuring what finetuning did.

    evaluate.py       perplexity of a text file and lm-evaluation-harness tasks, as scripts/evaluate.py runs them
    lm_eval_model.py  a lit-lora model inside EleutherAI's lm-evaluation-harness
    compare.py        the method comparison: the same model and data finetuned by each method, scored, tabled, plotted
    dates.py          the quickstart's task for a real model: the date in a sentence, written as YYYY-MM-DD
    synthetic.py      the quickstart's synthetic instruction world and its tiny pretrained base (--tiny)

May import: the teaching files, `lit_lora.files`, `lit_lora.speed`. Nothing below imports this package.
"""
