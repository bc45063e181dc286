"""Gaussian diffusion: schedules, losses, conditioning, samplers, cascade preprocessing."""
