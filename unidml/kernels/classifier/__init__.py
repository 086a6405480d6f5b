"""Fused classifier losses that never hold an n × C tensor (docs/design.md, "Classifier and proxy losses").

`dispatch.class_scores` streams class chunks of the logits l_ik = s·(x_i·v_k + b_k) and returns only
per-row and per-column log-sum-exps, the target dots and Σ_k v_k, with a recomputing backward that
accumulates dX = G·V and dW = Gᵀ·X tile by tile (backends: `reference` materialising oracle,
`tiled` PyTorch, `triton` GPU). `softmax.softmax_terms` (cross-entropy with label smoothing,
CosFace / ArcFace margins) and `proxy_anchor.proxy_anchor_terms` build the losses on it, over a
`head.ClassifierHead` that may be sharded by class over ranks (`parallel`).
"""
