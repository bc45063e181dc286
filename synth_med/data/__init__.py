"""Data: procedural worlds, the example schema, the grain input pipeline, augmentations."""
