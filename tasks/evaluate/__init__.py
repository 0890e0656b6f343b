"""Evaluation: benchmark files, log-likelihood scoring, model loading and the evaluation stage."""
