"""Embedding networks: backbones (torchvision, timm), pooling, projection, weights from local disk only."""
from unidml.models.embedding_net import EmbeddingNet
from unidml.models.registry import Backbone, build_model, check_model_config, list_models, register_family

__all__ = ["Backbone", "EmbeddingNet", "build_model", "check_model_config", "list_models", "register_family"]
