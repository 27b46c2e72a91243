"""Pretraining with HF Accelerate: config, data, tokenizer, optimizer, checkpoints, metrics, loop."""
