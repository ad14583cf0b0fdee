"""Our numpy/PIL preprocessing equals SAM2Transforms."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export_tools
from sam2serve.images import synthetic_scene
from sam2serve.preprocess import to_model_coords, to_model_input

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@needs_export_tools
@pytest.mark.parametrize("hw", [(480, 640), (1200, 1800), (300, 200)])
def test_image_transform_matches_sam2transforms(hw):
    from sam2.utils.transforms import SAM2Transforms

    image = synthetic_scene(*hw, seed=hw[0])
    ref = SAM2Transforms(resolution=1024, mask_threshold=0.0)(image).numpy()[None]
    ours = to_model_input(image, 1024, MEAN, STD)
    assert ours.shape == (1, 3, 1024, 1024) and ours.dtype == np.float32
    assert np.max(np.abs(ours - ref)) < 1e-5


@needs_export_tools
def test_coordinate_transform_matches_sam2transforms():
    import torch
    from sam2.utils.transforms import SAM2Transforms

    pts = np.random.default_rng(0).uniform(0, 1200, size=(10, 1, 2)).astype(np.float32)
    ref = SAM2Transforms(1024, 0.0).transform_coords(torch.from_numpy(pts), normalize=True, orig_hw=(1200, 1800))
    np.testing.assert_allclose(to_model_coords(pts, (1200, 1800), 1024), ref.numpy(), rtol=1e-6)


def test_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_model_input(np.zeros((4, 4), np.uint8), 1024, MEAN, STD)
