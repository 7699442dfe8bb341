"""Samples, loaders and collation: (image, prompt, response) triples for VQA and captioning."""
from defend.data.samples import DataError, Sample
from defend.data.loaders import load_samples

__all__ = ["DataError", "Sample", "load_samples"]
