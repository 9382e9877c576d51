"""Evaluation: accuracy metrics from scored samples (`metrics`) and ProcessBench for reward models (`processbench`)."""
