"""Sample-pipeline transforms: the whole-image crop equals RandomResizedCrop at scale (1, 1), pixel for pixel."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from mm_lightning.data.samples import WholeImageCrop, image_transforms, simclr_transforms


@pytest.mark.parametrize("shape", [(32, 32), (17, 17), (64, 64), (24, 24)])
def test_whole_image_crop_is_random_resized_crop_at_scale_one(shape):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=g)
    ours = WholeImageCrop(24)(image)
    for seed in range(20):  # RandomResizedCrop draws at random before it falls back: the same outcome every time
        torch.manual_seed(seed)
        assert torch.equal(v2.RandomResizedCrop(24, scale=(1.0, 1.0), antialias=True)(image), ours), (shape, seed)


def test_whole_image_crop_of_other_aspect_ratios_keeps_the_centre_within_the_ratio():
    image = torch.arange(20 * 90, dtype=torch.uint8).reshape(1, 20, 90).expand(3, -1, -1).contiguous()
    wide = WholeImageCrop(20)(image)  # 90 / 20 > 4/3: the centred 27 x 20 crop, resized to 20 x 20
    expected = v2.functional.resized_crop(image, 0, (90 - 27) // 2, 20, 27, [20, 20], antialias=True)
    assert torch.equal(wide, expected)
    assert WholeImageCrop(16)(torch.zeros(3, 30, 40, dtype=torch.uint8)).shape == (3, 16, 16)


def test_pipelines_use_it_only_at_scale_one():
    assert isinstance(image_transforms(32, True, (1.0, 1.0)).transforms[0], WholeImageCrop)
    assert isinstance(image_transforms(32, True, (0.5, 1.0)).transforms[0], v2.RandomResizedCrop)
    assert isinstance(simclr_transforms(32, (1.0, 1.0)).transforms[0], WholeImageCrop)
