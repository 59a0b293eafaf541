"""mm-lightning: train multimodal models from WebDataset shards with PyTorch Lightning."""

__version__ = "0.1.0"
