"""Training: one functional, sharded loop that every model (diffusion, upsampler, classifier) reuses."""
