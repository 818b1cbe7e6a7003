"""Image preprocessing as each checkpoint's reference does it: HF image processors or timm's eval transform.

Images are resized with Pillow using the same filter the reference uses (both transformers'
PIL backend and torchvision on PIL images call `PIL.Image.resize`), so uint8 inputs give
bit-identical pixels; rescaling and normalising follow in NumPy.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zoo.errors import ConfigError, ImageError
from zoo.models.fields import Fields

PREPROCESSOR_FILE = "preprocessor_config.json"
# timm's interpolation names -> PIL filters.
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImagePreprocessor:
    """Turns images into normalised channels-last float32 arrays `(batch, height, width, channels)`.

    Exactly one resize rule is used: `size` (height, width) resizes to that size, or
    `shortest_edge` scales the shorter side to it keeping the aspect ratio (torchvision's
    rule). A `crop_size` then takes the centre crop.

    Example:
        >>> pre = ImagePreprocessor(size=(32, 32))
        >>> pre([np.zeros((20, 30, 3), np.uint8)]).shape
        (1, 32, 32, 3)
    """

    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    crop_size: tuple[int, int] | None = None
    resample: int = 2
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    std: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    num_channels: int = 3
    source_format: str = "hf"

    # ------------------------------------------------------------------ readers and writers

    @classmethod
    def from_hf(cls, raw: dict, num_channels: int = 3) -> "ImagePreprocessor":
        get = Fields(raw, PREPROCESSOR_FILE)
        size = _hf_size(get, "size", {"height": 224, "width": 224}) if get.flag("do_resize", True) else None
        crop = _hf_size(get, "crop_size", None, shortest=False) if get.flag("do_center_crop", False) else None
        normalize, channels = get.flag("do_normalize", True), (1, num_channels)
        return cls(
            size=(size["height"], size["width"]) if size and "height" in size else None,
            shortest_edge=size.get("shortest_edge") if size else None,
            crop_size=(crop["height"], crop["width"]) if crop else None,
            resample=_resample(get),
            rescale_factor=get.number("rescale_factor", 1 / 255, minimum=0.0) if get.flag("do_rescale", True) else None,
            mean=get.numbers("image_mean", (0.5,) * 3, channels) if normalize else None,
            std=_std(get, "image_std", (0.5,) * 3, channels) if normalize else None,
            num_channels=num_channels,
        )

    def to_hf(self) -> dict:
        out = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": self.size is not None or self.shortest_edge is not None,
            "resample": self.resample,
            "do_center_crop": self.crop_size is not None,
            "do_rescale": self.rescale_factor is not None,
            "rescale_factor": self.rescale_factor if self.rescale_factor is not None else 1 / 255,
            "do_normalize": self.mean is not None,
            "image_mean": list(self.mean or (0.5,) * 3),
            "image_std": list(self.std or (0.5,) * 3),
        }
        if self.size is not None:
            out["size"] = {"height": self.size[0], "width": self.size[1]}
        elif self.shortest_edge is not None:
            out["size"] = {"shortest_edge": self.shortest_edge}
        if self.crop_size is not None:
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return out

    @classmethod
    def from_timm(cls, pretrained_cfg: dict, image_size: tuple[int, int], num_channels: int = 3) -> "ImagePreprocessor":
        """timm's `transforms_imagenet_eval` for crop_mode 'center' (or 'squash')."""
        get = Fields(pretrained_cfg, "config.json pretrained_cfg")
        crop_pct = get.number("crop_pct", 0.875, positive=True)
        interpolation = get.text("interpolation", "bicubic")
        if interpolation not in PIL_FILTERS:
            raise ConfigError(f"config.json: pretrained_cfg.interpolation {interpolation!r} is not one of {sorted(PIL_FILTERS)}")
        crop_mode = get.text("crop_mode", "center")
        scale = tuple(math.floor(s / crop_pct) for s in image_size)
        channels = (1, num_channels)
        common = dict(
            crop_size=tuple(image_size),
            resample=PIL_FILTERS[interpolation],
            rescale_factor=1 / 255,
            mean=get.numbers("mean", (0.485, 0.456, 0.406), channels),
            std=_std(get, "std", (0.229, 0.224, 0.225), channels),
            num_channels=num_channels,
            source_format="timm",
        )
        if crop_mode == "squash" or (crop_mode == "center" and scale[0] != scale[1]):
            return cls(size=scale, **common)
        if crop_mode != "center":
            raise ConfigError(f"config.json: pretrained_cfg.crop_mode {crop_mode!r} is not supported (center, squash)")
        return cls(size=None, shortest_edge=scale[0], **common)

    # ------------------------------------------------------------------ the transform

    def __call__(self, images) -> np.ndarray:
        """Paths, PIL images, uint8 arrays `(h, w, c)` or a batch `(b, h, w, c)` -> float32 batch."""
        return np.stack([self._one(image) for image in _as_list(images)])

    def _one(self, image) -> np.ndarray:
        pil = to_pil(image, self.num_channels)
        if 0 in pil.size:
            raise ImageError(f"an empty image ({pil.size[0]}x{pil.size[1]}): nothing to classify")
        if self.size is not None:
            pil = pil.resize((self.size[1], self.size[0]), resample=self.resample)
        elif self.shortest_edge is not None:
            pil = pil.resize(_shortest_edge_size(pil.size, self.shortest_edge), resample=self.resample)
        if self.crop_size is not None:
            pil = _center_crop(pil, self.crop_size)
        pixels = np.asarray(pil)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if self.rescale_factor is not None:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.mean is not None:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.astype(np.float32)


def _hf_size(get: Fields, key: str, default, shortest: bool = True) -> dict | None:
    """One of HF's size spellings, checked: an int, {"height", "width"}, or {"shortest_edge"} if allowed."""
    value = get.raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    if isinstance(value, dict) and ({"height", "width"} & set(value) or not shortest):
        sub = Fields(value, f"{get.where} {key}")
        return {"height": sub.integer("height"), "width": sub.integer("width")}
    if isinstance(value, dict) and "shortest_edge" in value:
        return {"shortest_edge": Fields(value, f"{get.where} {key}").integer("shortest_edge")}
    spellings = "an int, or height and width" + (", or shortest_edge" if shortest else "")
    raise ConfigError(f"{get.where}: field {key!r} should be {spellings}; got {value!r}")


def _resample(get: Fields) -> int:
    value = get.integer("resample", 2, minimum=0)
    if value not in PIL_FILTERS.values():
        raise ConfigError(f"{get.where}: field 'resample' should be a PIL filter number {sorted(PIL_FILTERS.values())}, "
                          f"got {value!r}")
    return value


def _std(get: Fields, key: str, default, lengths) -> tuple[float, ...]:
    std = get.numbers(key, default, lengths)
    if not all(std):
        raise ConfigError(f"{get.where}: field {key!r} should not hold a zero (it divides), got {list(std)}")
    return std


def _shortest_edge_size(size_wh: tuple[int, int], edge: int) -> tuple[int, int]:
    """torchvision's rule: the short side becomes `edge`, the long side is truncated, not rounded."""
    w, h = size_wh
    if w <= h:
        return edge, int(edge * h / w)
    return int(edge * w / h), edge


def _center_crop(pil: Image.Image, crop_hw: tuple[int, int]) -> Image.Image:
    w, h = pil.size
    ch, cw = crop_hw
    if ch > h or cw > w:  # pad with zeros, as torchvision does, then crop
        padded = Image.new(pil.mode, (max(w, cw), max(h, ch)))
        padded.paste(pil, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
        pil, (w, h) = padded, padded.size
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return pil.crop((left, top, left + cw, top + ch))


def _as_list(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    images = list(images)
    if not images:
        raise ImageError("expected at least one image, got an empty list")
    return images


def to_pil(image, num_channels: int = 3) -> Image.Image:
    """A path, PIL image or uint8 array as a PIL image in RGB (or L for one channel)."""
    mode = "RGB" if num_channels == 3 else "L"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert(mode)
        except FileNotFoundError:
            raise ImageError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"{path}: cannot decode the image (expected PNG, JPEG or another format Pillow reads): {e}") from e
    if isinstance(image, Image.Image):
        return image.convert(mode)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"expected a uint8 array (h, w, c) with values 0-255, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ImageError(f"expected an image array of shape (h, w), (h, w, 1), (h, w, 3) or (h, w, 4), got {image.shape}")
        return Image.fromarray(image).convert(mode)
    raise ImageError(f"expected a file path, a PIL image or a uint8 array, got {type(image).__name__}")
