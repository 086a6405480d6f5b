"""The augmentation recipe (docs/design.md, "Training recipe"), shared by the DALI and torchvision backends."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from unidml.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """Train: optional resize (`none|shorter|square` to `resize_size`), RandomResizedCrop to
    `image_size` with `crop_scale`/`crop_ratio`, flip, color jitter (b, c, s, h as torchvision's
    ColorJitter). Test: resize the shorter side to `resize_size`, center crop `image_size`.
    Both end with ImageNet mean/std normalisation into float32 CHW."""

    image_size: int = 224
    resize_size: int = 256
    train_resize: str = "none"
    crop_scale: tuple[float, float] = (0.16, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: bool = True
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @classmethod
    def from_config(cls, data_cfg: Any) -> "Recipe":
        if data_cfg.resize_size < data_cfg.image_size:
            raise UserError(f"data.resize_size={data_cfg.resize_size} is smaller than data.image_size="
                            f"{data_cfg.image_size}: the test center crop would leave the image")
        return cls(int(data_cfg.image_size), int(data_cfg.resize_size), str(data_cfg.train_resize),
                   tuple(float(v) for v in data_cfg.crop_scale), tuple(float(v) for v in data_cfg.crop_ratio),
                   bool(data_cfg.hflip), tuple(float(v) for v in data_cfg.color_jitter))

    @property
    def jitter(self) -> bool:
        return any(v > 0 for v in self.color_jitter)


def center_crop_origin(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of a centered `size` crop, halves rounded up (DALI's convention; torchvision's
    CenterCrop rounds halves to even, one pixel apart for half the odd margins)."""
    return (height - size + 1) // 2, (width - size + 1) // 2


def center_crop(image, size: int):
    """Center crop of a PIL image or CHW tensor with `center_crop_origin`."""
    from torchvision.transforms.v2 import functional as F

    height, width = F.get_size(image)
    top, left = center_crop_origin(height, width, size)
    return F.crop(image, top, left, size, size)


def torchvision_transform(recipe: Recipe, train: bool) -> Callable:
    """torchvision.transforms.v2 pipeline: PIL image or uint8 CHW tensor → normalised float32 CHW."""
    import torch
    from torchvision.transforms import v2

    ops: list = []
    if train:
        if recipe.train_resize == "shorter":
            ops.append(v2.Resize(recipe.resize_size))
        elif recipe.train_resize == "square":
            ops.append(v2.Resize((recipe.resize_size, recipe.resize_size)))
        ops.append(v2.RandomResizedCrop(recipe.image_size, scale=recipe.crop_scale, ratio=recipe.crop_ratio))
        if recipe.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if recipe.jitter:
            ops.append(v2.ColorJitter(*recipe.color_jitter))
    else:
        ops += [v2.Resize(recipe.resize_size), v2.Lambda(functools.partial(center_crop, size=recipe.image_size))]
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)
