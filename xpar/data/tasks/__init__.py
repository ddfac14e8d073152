"""Shipped fine-tuning tasks, built from local files only (nothing is downloaded).

stdlib_code  which standard-library package a chunk of Python source comes from
             (python -m xpar.data.tasks.stdlib_code --out DIR; ensure_task(cache_root))
"""
