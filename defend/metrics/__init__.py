"""Task metrics: VQA accuracy, captioning scores."""
