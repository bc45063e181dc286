"""Objectives: classification losses and the classifier task."""
