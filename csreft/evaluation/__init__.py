"""Evaluation: scoring (exact match, label log-likelihood, response NLL), paired statistics,
multi-skill suites and their data, and the instruction-tuning evaluation."""
