"""Continual pretraining: one model trained on a stream of tasks, with replay, per-task or infinite
learning-rate schedules, and forgetting measured on every task (``memlm continual``)."""
