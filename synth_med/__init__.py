"""synth_med: generative models for fairer, more robust medical classifiers (JAX/Flax)."""

__version__ = "0.1.0"
