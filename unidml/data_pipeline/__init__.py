"""Data pipeline: dataset readers, distributed samplers, DALI and torchvision loaders
(docs/design.md, "Datasets" and "Training recipe")."""
from unidml.data_pipeline.build import build_dataset, build_eval_loader, build_train_loader
from unidml.data_pipeline.dataset import DatasetDescription, ImageSet

__all__ = ["DatasetDescription", "ImageSet", "build_dataset", "build_eval_loader", "build_train_loader"]
