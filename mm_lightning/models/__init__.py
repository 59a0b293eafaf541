"""Plain ``nn.Module``s, no Lightning: every task's network (``task.model``) and the loader that rebuilds it.

* :class:`CLIP` (``models/clip.py``), :class:`SSLEncoder` (SimCLR, MoCo), :class:`MetricEmbedder`
  (metric learning), timm classifiers via :func:`create_backbone` (``vit_shapes`` registered there);
* :func:`load_model`: a run's checkpoint -> its network, weights-only;
* :func:`load_backbone_weights`: a backbone's weights out of another run's checkpoint (CLIP's
  ``image_init``, the multimodal LLM's ``vision_init``).
"""

from mm_lightning.models.clip import CLIP, CheckpointMismatchError, backbone_prefix, load_backbone_weights
from mm_lightning.models.loading import build_model, load_model, model_spec
from mm_lightning.models.metric import MetricEmbedder
from mm_lightning.models.ssl import SSLEncoder
from mm_lightning.models.vision import create_backbone

__all__ = [
    "CLIP",
    "CheckpointMismatchError",
    "MetricEmbedder",
    "SSLEncoder",
    "backbone_prefix",
    "build_model",
    "create_backbone",
    "load_backbone_weights",
    "load_model",
    "model_spec",
]
