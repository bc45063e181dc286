"""Experiments: stages with skip/resume, and the command-line entry point."""
