"""Analyses of finished studies (paper 002 App. D, F, G and what fairness users expect)."""
