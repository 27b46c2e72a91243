"""Recall probes and evaluation: MQAR, S-NIAH-1/2/3, passkey, perplexity, lm-eval adapter.

The lm-evaluation-harness adapter (``memlm.eval.harness``) is imported on demand only, so
lm-eval stays an optional dependency.
"""

from memlm.eval.mqar.state_size import recurrent_state_size
from memlm.eval.mqar.sweep import MQARSweepConfig, load_sweep_config, run_mqar_sweep
from memlm.eval.mqar.task import IGNORE_INDEX, MQARData, generate_mqar, mqar_train_test, recall_counts
from memlm.eval.mqar.train import MQARTrainResult, evaluate_mqar, train_mqar
from memlm.eval.needle.probe import needle_table, run_needle_probe
from memlm.eval.needle.task import TASKS as NEEDLE_TASKS
from memlm.eval.needle.task import NeedleSample, build_sample
from memlm.eval.perplexity import perplexity, run_perplexity_probe
from memlm.eval.scoring import contains_answer, first_integer, passkey_correct

__all__ = [
    "IGNORE_INDEX", "MQARData", "MQARSweepConfig", "MQARTrainResult", "NEEDLE_TASKS", "NeedleSample",
    "build_sample", "contains_answer", "evaluate_mqar", "first_integer", "generate_mqar",
    "load_sweep_config", "mqar_train_test", "needle_table", "passkey_correct", "perplexity", "recall_counts",
    "recurrent_state_size", "run_mqar_sweep", "run_needle_probe", "run_perplexity_probe", "train_mqar",
]
