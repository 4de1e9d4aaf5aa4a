"""Evaluation: RULER-style long-context tasks, multi-turn QA, fidelity, sweeps and reports."""
