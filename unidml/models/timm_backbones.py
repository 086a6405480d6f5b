"""timm backbones: `model.arch: timm/NAME[.TAG]` for any timm model (ViT, DINO, DINOv2, ConvNeXt, EfficientNet, ...).

Built with `pretrained=False` and `num_classes=0`; with `model.pooling: auto` the model keeps its own
global pooling (the class token for ViTs, average for CNNs), otherwise it is built unpooled
(`global_pool=''`) and `unidml.models.pooling` pools its maps or tokens. Models with a fixed input
size (ViTs) are built for `data.image_size`; pretrained position embeddings of another grid are
resampled when loaded. Weights: a file, or a pretrained tag (`model.pretrained: dino`, or `default`
for the arch's own tag) looked up in the local Hugging Face and torch hub caches. timm ResNets use
torchvision's parameter names, so torchvision ResNet weight files load into them too.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from unidml.errors import UserError
from unidml.models.pretrained import (
    FOLDER_FILES,
    NO_WEIGHTS,
    WEIGHT_SUFFIXES,
    hf_cached_file,
    load_file_into,
    looks_like_path,
    missing,
)
from unidml.models.registry import Backbone, register_family


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("model.arch: timm/... backbones need the timm package (pip install 'unidml[timm]')") from None
    return timm


def _pretrained_cfg(name: str, tag: str):
    """timm's pretrained config of `name.tag` (timm's default tag when `tag` is empty)."""
    timm = _timm()
    try:
        return timm.models.get_pretrained_cfg(f"{name}.{tag}" if tag else name)
    except RuntimeError:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
        raise UserError(f"model.pretrained: timm has no pretrained tag '{tag}' for '{name}' "
                        f"(tags: {', '.join(tags) or 'none'})") from None


def weight_candidates(name: str, tag: str) -> tuple[Path | None, list[Path]]:
    """(the cached weights file of `name.tag`, or None; the places looked in)."""
    cfg = _pretrained_cfg(name, tag)
    places: list[Path] = []
    if cfg is not None and cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else FOLDER_FILES
        found, folder = hf_cached_file(cfg.hf_hub_id, files)
        if found is not None:
            return found, [folder]
        places.append(folder)
    if cfg is not None and cfg.url and cfg.url.endswith(WEIGHT_SUFFIXES):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return cached, [cached]
        places.append(cached)
    return None, places


def resample_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resize the weights' absolute position embeddings to the model's patch grid (bicubic, as timm)."""
    target = getattr(model, "pos_embed", None)
    source = state.get("pos_embed")
    if not isinstance(target, torch.Tensor) or source is None or source.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    resized = resample_abs_pos_embed(source, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    return {**state, "pos_embed": resized}


def _classifier_keys(cfg) -> tuple[str, ...]:
    head = cfg.classifier if cfg is not None else None
    return tuple(head) if isinstance(head, (list, tuple)) else ((head,) if head else ())


def _layer_of(model: nn.Module) -> dict[str, int]:
    """timm's own layer grouping (stem = 0, then blocks in order), as timm's layer-decay optimiser uses."""
    if not hasattr(model, "group_matcher"):
        return {}
    from timm.models import group_parameters

    return dict(group_parameters(model, model.group_matcher(coarse=False), reverse=True))


@register_family("timm/")
class TimmFamily:
    """`model.arch: timm/NAME[.TAG]`."""

    prefix = "timm/"

    def names(self) -> list[str]:
        return [self.prefix + n for n in _timm().list_models()]

    def check_name(self, name: str) -> tuple[str, str]:
        """(architecture, tag) of `NAME[.TAG]`; a one-line error for an unknown one."""
        timm = _timm()
        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join('timm/' + c for c in close)}?)" if close else ""
            raise UserError(f"model.arch: unknown timm model '{arch}'{hint}; `unidml models PATTERN` lists them")
        if tag:
            _pretrained_cfg(arch, tag)
        return arch, tag

    def build(self, name: str, model_cfg: DictConfig, image_size: int, load_weights: bool) -> Backbone:
        arch, tag = self.check_name(name)
        timm = _timm()
        cfg = _pretrained_cfg(arch, tag)
        kwargs = dict(model_cfg.kwargs)
        if cfg is not None and cfg.fixed_input_size:
            kwargs.setdefault("img_size", image_size)
        if model_cfg.pooling != "auto":
            kwargs["global_pool"] = ""
        try:
            model = timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise UserError(f"model.arch: timm/{name} cannot be built with {kwargs} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        spec = str(model_cfg.pretrained)
        if load_weights and spec not in NO_WEIGHTS:
            self._load(model, spec, arch, tag, bool(model_cfg.pretrained_required), _classifier_keys(cfg))
        if model_cfg.pooling == "auto":
            output, dim = "pooled", int(getattr(model, "head_hidden_size", None) or model.num_features)
        elif hasattr(model, "num_prefix_tokens"):
            output, dim = "tokens", int(model.num_features)
        elif getattr(model, "output_fmt", "NCHW") != "NCHW":
            raise UserError(f"model.pooling: timm/{name} outputs {model.output_fmt} feature maps; "
                            f"use model.pooling=auto (its own pooling)")
        else:
            output, dim = "maps", int(model.num_features)
        no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return Backbone(model, output, dim, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
                        layer_of=_layer_of(model), no_weight_decay=tuple(no_decay))

    def _load(self, model: nn.Module, spec: str, arch: str, tag: str, required: bool, head: tuple[str, ...]) -> None:
        label = f"timm/{arch}"
        if looks_like_path(spec):
            path = Path(spec).expanduser()
        else:
            wanted_arch, _, wanted_tag = spec.rpartition(".") if "." in spec else ("", "", spec)
            if wanted_arch and wanted_arch != arch:
                raise UserError(f"model.pretrained: '{spec}' names weights of '{wanted_arch}', not of '{arch}'")
            found, places = weight_candidates(arch, tag if wanted_tag == "default" else wanted_tag)
            if found is None:
                missing(spec, places or [Path(spec)], required)
                return
            path = found
        load_file_into(model, path, spec, label, required, ignore=head,
                       adapt=lambda state: resample_pos_embed(model, state))
