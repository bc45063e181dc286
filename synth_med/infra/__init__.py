"""The bottom layer every other package may use: atomic file writes and run markers (`artifacts`),
console progress (`progress`), image grids (`image_grid`), and the device mesh and sharding helpers
(`sharding`) that the data pipeline, the training loop and the generators share."""
