"""Evaluation harness: the ``vtprune`` lmms-eval model, sweeps, tables and plots (needs ``vtprune[eval]``)."""
