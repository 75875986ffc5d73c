"""Image preprocessing of the vision family: HF's ``CLIPImageProcessor`` / ``ViTImageProcessor`` pipeline in numpy.

Why not call ``transformers``' image processors (already a dependency)? They do work without torch (transformers 5
falls back to ``CLIPImageProcessorPil`` / ``ViTImageProcessorPil`` when torchvision is absent, same numbers), but
importing them is slow, and data loading pays it in every process: measured on this project's 2-core CPU machine
(transformers 5.23, load average 6-13 from other jobs), ``import transformers; transformers.CLIPImageProcessorPil``
took 5.0 s with torch hidden and 50-53 s with torch installed (transformers then imports it), against 1.1 s for a
fresh interpreter to import this module (numpy only). tests/models/test_vit.py pins this module to transformers' own
``CLIPImageProcessorPil`` (with and without crop) and ``ViTImageProcessorPil``, so the two cannot drift apart
silently.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Class defaults of HF's image processors (transformers 5: ``CLIPImageProcessor(Pil)``, ``ViTImageProcessor(Pil)``),
# used for keys that preprocessor_config.json leaves out. ``resample`` is a PIL code (2 bilinear, 3 bicubic).
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,
        default_to_square=False,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
    ),
    "ViTImageProcessor": dict(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=2,
        default_to_square=True,
        do_center_crop=False,
        crop_size=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    ),
}
# A config that names no processor class: HF's base defaults (every step off unless the config turns it on).
_GENERIC_DEFAULTS = dict(
    do_resize=False,
    size=None,
    resample=2,
    default_to_square=True,
    do_center_crop=False,
    crop_size=None,
    do_rescale=False,
    rescale_factor=1 / 255,
    do_normalize=False,
    image_mean=None,
    image_std=None,
)


def read_preprocessor_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parses ``preprocessor_config.json`` of a checkpoint folder (as written by HF's image processors).

    Args:
      path: checkpoint folder (or the json file itself).

    Returns:
      The dict, for :func:`preprocess`.
    """
    file = pathlib.Path(path)
    file = file / "preprocessor_config.json" if file.is_dir() else file
    if not file.is_file():
        raise FileNotFoundError(f"No preprocessor_config.json at {file}")
    return json.loads(file.read_text())


def _size_dict(size: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """HF's ``get_size_dict``: legacy ints / (h, w) tuples to a size dict; only the keys jgoat implements."""
    if isinstance(size, int):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
        raise ValueError(f"Cannot read {name}={size!r}")
    keys = set(size)
    if keys not in ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}):
        raise ValueError(
            f"{name} keys {sorted(keys)} are not supported; supported: height+width, shortest_edge, "
            "shortest_edge+longest_edge"
        )
    return {k: int(v) for k, v in size.items()}


def processor_settings(processor_config: dict[str, Any]) -> dict[str, Any]:
    """Every preprocessing setting of an HF image-processor config, with the processor class's defaults filled in.

    Args:
      processor_config: a parsed ``preprocessor_config.json``; ``image_processor_type`` (or the legacy
        ``feature_extractor_type``) picks the defaults: CLIPImageProcessor or ViTImageProcessor (also their
        ``Fast`` / ``Pil`` / ``FeatureExtractor`` spellings); absent, HF's base defaults (all steps off).

    Returns:
      ``{do_resize, size, resample, do_center_crop, crop_size, do_rescale, rescale_factor, do_normalize,
      image_mean, image_std}`` with ``size`` / ``crop_size`` as size dicts.

    Raises:
      ValueError: an unknown processor type or an unsupported size specification.
    """
    kind = processor_config.get("image_processor_type") or processor_config.get("feature_extractor_type")
    if kind is None:
        defaults = _GENERIC_DEFAULTS
    else:
        base = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
        if base not in _PROCESSOR_DEFAULTS:
            raise ValueError(f"Unsupported image processor {kind!r}; supported: {', '.join(_PROCESSOR_DEFAULTS)}")
        defaults = _PROCESSOR_DEFAULTS[base]
    s = {k: processor_config[k] if processor_config.get(k) is not None else v for k, v in defaults.items()}
    if s["do_resize"]:
        s["size"] = _size_dict(s["size"], bool(s.pop("default_to_square")), "size")
    else:
        s.pop("default_to_square")
    if s["do_center_crop"]:
        s["crop_size"] = _size_dict(s["crop_size"], True, "crop_size")
        if set(s["crop_size"]) != {"height", "width"}:
            raise ValueError(f"crop_size must have height and width, got {s['crop_size']}")
    if s["do_normalize"] and (s["image_mean"] is None or s["image_std"] is None):
        raise ValueError("do_normalize needs image_mean and image_std")
    return s


def _resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """HF's output size (``get_resize_output_image_size`` / ``get_size_with_aspect_ratio``), int truncation included."""
    if "height" in size:
        return size["height"], size["width"]
    target = size["shortest_edge"]
    if "longest_edge" in size:  # get_size_with_aspect_ratio
        max_size = size["longest_edge"]
        raw = None
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * target > max_size:
            raw = max_size * lo / hi
            target = int(round(raw))
        if (height <= width and height == target) or (width <= height and width == target):
            return height, width
        if width < height:
            return (int(raw * height / width) if raw is not None else int(target * height / width)), target
        return target, (int(raw * width / height) if raw is not None else int(target * width / height))
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (new_long, target) if width <= height else (target, new_long)


def _center_crop(image_HxWxC: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF's ``center_crop``: top-left at ``(size - crop) // 2``; zero-pads (centred) an image that is too small."""
    h, w = image_HxWxC.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return image_HxWxC[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w, image_HxWxC.shape[2]), image_HxWxC.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = image_HxWxC
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def preprocess(images: np.ndarray | Sequence[np.ndarray], processor_config: dict[str, Any]) -> np.ndarray:
    """HF's image-processor pipeline in numpy (+ PIL for resizing), with the same numbers as HF's PIL backend.

    Steps, as ``CLIPImageProcessor`` / ``ViTImageProcessor`` (PIL backend, the one transformers uses without
    torchvision): resize with PIL (shortest edge or height/width; ``resample`` from the config, bicubic for CLIP),
    center crop (zero-padding images that are too small), rescale (``uint8 -> float64 * rescale_factor -> float32``)
    and normalise (``(x - mean) / std`` in float32). PIL is needed only when an image actually changes size.

    Args:
      images: uint8 RGB images, ``[N, H, W, 3]`` or a sequence of ``[H, W, 3]`` arrays of any sizes.
      processor_config: a parsed ``preprocessor_config.json`` (see :func:`read_preprocessor_config` and
        :func:`processor_settings` for the keys and defaults).

    Returns:
      float32 ``[N, H', W', 3]`` channels-last pixel values, the input of jgoat's vision models (HF's
      ``pixel_values`` transposed from ``[N, 3, H', W']``).

    Raises:
      ValueError: non-uint8 / non-RGB images, images that end at different sizes (no crop), or bad settings.
      ModuleNotFoundError: resizing is needed and Pillow is not installed.

    Example::

      pixels_Nx224x224x3 = preprocess(images_uint8, read_preprocessor_config(folder))
    """
    s = processor_settings(processor_config)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(f"images must be [N, H, W, 3] or a list of [H, W, 3]; got one array of shape {images.shape}")
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"each image must be uint8 [H, W, 3] (RGB), got {image.dtype} {image.shape}")
        if s["do_resize"]:
            h, w = _resize_output_size(image.shape[0], image.shape[1], s["size"])
            if (h, w) != image.shape[:2]:  # PIL returns an identical copy for an unchanged size
                image = _pil_resize(image, h, w, int(s["resample"]))
        if s["do_center_crop"]:
            image = _center_crop(image, s["crop_size"]["height"], s["crop_size"]["width"])
        if s["do_rescale"]:
            image = (image.astype(np.float64) * s["rescale_factor"]).astype(np.float32)
        if s["do_normalize"]:
            image = image if np.issubdtype(image.dtype, np.floating) else image.astype(np.float32)
            mean = np.asarray(s["image_mean"], image.dtype)
            std = np.asarray(s["image_std"], image.dtype)
            if mean.shape not in ((), (3,)) or std.shape not in ((), (3,)):
                raise ValueError(f"image_mean / image_std must have 1 or 3 values, got {mean.shape} / {std.shape}")
            image = (image - mean) / std
        out.append(image.astype(np.float32))
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise ValueError(
            f"preprocessed images differ in size {sorted(shapes)}: the config needs a crop or a fixed size"
        )
    if not out:
        raise ValueError("no images")
    return np.stack(out)


@functools.cache
def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("Resizing images needs Pillow: pip install pillow", name="PIL") from err
    return Image


def _pil_resize(image_HxWx3: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """PIL resize of a uint8 RGB image, exactly as HF's ``resize`` (PIL takes (width, height))."""
    return np.asarray(_pil().fromarray(image_HxWx3).resize((width, height), resample=resample))
