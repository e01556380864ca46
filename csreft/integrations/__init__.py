"""Optional third-party formats and tools: lm-evaluation-harness, pyreft checkpoints."""
