"""mm-lightning: train multimodal models from WebDataset shards with PyTorch Lightning."""

import logging

__version__ = "0.1.0"

# torchao (which transformers imports when it is installed) registers Enum subclasses with torch's pytree, and torch
# 2.14 logs a deprecation warning for each on every process start ("... KernelPreference is an Enum subclass ...").
# A third party's notice about its own internals: filtered by its message, so that our one-line errors stay one line.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())
