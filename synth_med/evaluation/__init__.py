"""Evaluation: metrics (scikit-learn), fairness (fairlearn MetricFrame), evaluators."""
