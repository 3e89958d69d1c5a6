"""Evaluation: the MIBE benchmark tasks, generation, the eval harness and related checks (DESIGN §2)."""
