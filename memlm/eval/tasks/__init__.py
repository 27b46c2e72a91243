"""lm-evaluation-harness task configs: memlm's task groups and the Based / JRT recall tasks."""
