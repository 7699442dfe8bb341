"""DeepSpeed: config resolution, distributed init, the training engine."""
