"""Retrieval evaluation: embedding extraction per rank, sharded exact FAISS k-NN, metrics
(docs/design.md, "Evaluation")."""
from unidml.evaluation.evaluate import evaluate_model, extract_embeddings
from unidml.evaluation.retrieval import retrieval_metrics, sharded_knn

__all__ = ["evaluate_model", "extract_embeddings", "retrieval_metrics", "sharded_knn"]
