"""Image preprocessing against transformers' image processor, and timm's eval geometry."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from zoo import ImagePreprocessor
from zoo.errors import ImageError


@pytest.mark.parametrize("size,resample", [((224, 224), 2), ((40, 56), 3), ((30, 30), 0)])
def test_matches_transformers_processor(tmp_path, size, resample):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((97, 131), (300, 200), (30, 30))]
    hf_config = {"size": {"height": size[0], "width": size[1]}, "resample": resample,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    reference = ViTImageProcessorPil(**hf_config)
    want = reference(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = ImagePreprocessor.from_hf(hf_config)
    np.testing.assert_allclose(ours(images), want, atol=1e-6, rtol=0)
    # Every input kind gives the same pixels: arrays, PIL images, paths.
    path = tmp_path / "a.png"
    Image.fromarray(images[0]).save(path)
    np.testing.assert_array_equal(ours(path), ours([Image.fromarray(images[0])]))
    np.testing.assert_array_equal(ours(images[0]), ours(np.stack([images[0]])))


def test_round_trips_its_hf_config():
    pre = ImagePreprocessor(size=(40, 56), resample=3, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert ImagePreprocessor.from_hf(pre.to_hf()) == pre


def test_timm_eval_geometry():
    pre = ImagePreprocessor.from_timm({"crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.5] * 3,
                                       "std": [0.5] * 3}, (224, 224))
    assert (pre.shortest_edge, pre.crop_size, pre.resample) == (248, (224, 224), 3)
    image = np.random.default_rng(2).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    # torchvision: short side 200 -> 248, long side int(248 * 300 / 200) = 372; crop at round((372-224)/2) = 74.
    resized = Image.fromarray(image).resize((372, 248), Image.BICUBIC)
    crop = np.asarray(resized)[12:236, 74:298]
    want = (crop.astype(np.float64) / 255).astype(np.float32)
    np.testing.assert_allclose(pre(image)[0], (want - 0.5) / 0.5, atol=1e-6)


def test_grayscale_and_rgba_inputs():
    gray = ImagePreprocessor(size=(8, 8), mean=(0.5,), std=(0.5,), num_channels=1)
    rgba = np.full((8, 8, 4), 255, np.uint8)
    assert gray(rgba).shape == (1, 8, 8, 1)
    rgb = ImagePreprocessor(size=(8, 8))
    assert rgb(np.zeros((8, 8), np.uint8)).shape == (1, 8, 8, 3)


def test_bad_inputs():
    pre = ImagePreprocessor(size=(8, 8))
    with pytest.raises(ImageError, match="expected at least one image"):
        pre([])
    with pytest.raises(ImageError, match=r"got \(8, 8, 5\)"):
        pre(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ImageError, match="got int"):
        pre([3])
