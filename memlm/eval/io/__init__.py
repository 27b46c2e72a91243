"""Shared probe I/O: loading the model and tokenizer, JSON records and tables, plots."""
