"""What the MVP projector sees in one image (used by notebooks/explore_mvp.ipynb).

- the relation perspective's graph over patches at a threshold tau (`relation_graph`) and the fraction of
  patch pairs it links (`edge_density`, `density_by_tau`);
- the `gated_sum` weight of each perspective at each visual token (`gate_weights`);
- the model with one perspective removed (`without_perspective`) and the answers with and without each one
  (`answers_by_perspective`).

"Without perspective k" is the same model with MVP configured without k and the same weights: under `sum`
fusion its term is dropped; under `gated_sum` the softmax gates are taken over the remaining perspectives
(the K-1 others get weights K-1 softmax over their own logits); under `concat` its tokens are gone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig
from emollm_jax.models.projectors import MVPProjector, similarity_graph


def mvp_of(model: EmoLLM) -> MVPProjector:
    """The model's MVP projector; ValueError naming the configured kind otherwise."""
    if not isinstance(model.projector, MVPProjector):
        raise ValueError(f"the model's projector is {model.config.projector.kind!r}, not 'mvp'")
    return model.projector


def image_pixels(model_cfg: EmoLLMConfig, image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """An image file (or uint8[H, W, 3]) -> float32[1, S, S, 3] pixels, preprocessed as the data pipeline
    does for this model's tower."""
    from data_pipeline.media import load_image, preprocess_image

    img = image if isinstance(image, np.ndarray) else load_image(image)
    pre = model_cfg.vision.preprocessing()
    return preprocess_image(img, pre.image_size, pre.mode, pre.mean, pre.std)[None]


def token_grid(model_cfg: EmoLLMConfig) -> tuple[int, int]:
    """(side of the square patch grid, index of the first grid patch among the projector's input tokens):
    1 when the selected tokens start with the tower's class token (`vision_feature_select="full"`)."""
    side = int(round(model_cfg.vision.num_patches ** 0.5))
    offset = model_cfg.vision.num_prefix_tokens - model_cfg.first_patch
    return side, offset


def relation_graph(patches: Any, tau: float) -> np.ndarray:
    """float[N, P, Dv] (or float[P, Dv]) patch features -> bool[N, P, P] (or bool[P, P]) adjacency of the
    relation perspective: an edge where cosine similarity > tau, plus self loops."""
    x = np.asarray(patches)
    adj = np.asarray(similarity_graph(x[None] if x.ndim == 2 else x, float(tau))) > 0
    return adj[0] if x.ndim == 2 else adj


def edge_density(adj: np.ndarray) -> float:
    """Fraction of distinct patch pairs linked (self loops not counted): 0 = every patch alone, 1 =
    complete graph. bool[..., P, P]; the mean over leading axes."""
    adj = np.asarray(adj, bool)
    p = adj.shape[-1]
    if p < 2:
        return 0.0
    off = adj.sum(axis=(-2, -1)) - np.trace(adj, axis1=-2, axis2=-1)
    return float(np.mean(off / (p * (p - 1))))


def density_by_tau(patches: Any, taus: Sequence[float]) -> np.ndarray:
    """float[len(taus)]: `edge_density` of the relation graph at each tau."""
    return np.asarray([edge_density(relation_graph(patches, t)) for t in taus])


def gate_weights(model: EmoLLM, pixels: Any) -> np.ndarray:
    """float32[K, N, P]: the `gated_sum` weight of each perspective (in `config.projector.perspectives`
    order) at each visual token of pixels float[N, H, W, 3]; they sum to K over perspectives."""
    proj = mvp_of(model)
    return np.asarray(proj.gates(model.vision_features(jax.numpy.asarray(pixels))))


def without_perspective(model: EmoLLM, name: str) -> EmoLLM:
    """The same model (weights shared, nothing copied) with MVP configured without perspective `name`; see
    the module docstring for what that means under each fusion."""
    from flax import nnx

    pc = mvp_of(model).cfg
    if name not in pc.perspectives:
        raise ValueError(f"{name!r} is not one of the projector's perspectives {pc.perspectives}")
    keep = [i for i, p in enumerate(pc.perspectives) if p != name]
    cfg = dataclasses.replace(model.config, projector=dataclasses.replace(
        pc, perspectives=tuple(pc.perspectives[i] for i in keep)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EmoLLM(cfg, rngs=nnx.Rngs(0))))
    old = nnx.to_pure_dict(nnx.state(model))

    def fill(target: Mapping[str, Any], source: Mapping[str, Any], path: tuple) -> dict[str, Any]:
        out = {}
        for key, value in target.items():
            if isinstance(value, Mapping):
                out[key] = fill(value, source[key], (*path, key))
            elif path == ("projector",) and key in ("gate_w", "gate_b"):
                out[key] = source[key][np.asarray(keep)]  # gates of the remaining perspectives, in order
            else:
                out[key] = source[key]
        return out

    nnx.replace_by_pure_dict(abstract, fill(nnx.to_pure_dict(abstract), old, ()))
    return nnx.merge(graphdef, abstract)


def answers_by_perspective(config: Any, workdir: str | os.PathLike, records: Sequence[Mapping[str, Any]],
                           data_root: str | os.PathLike, *, model: EmoLLM, tokenizer: Any) -> list[dict]:
    """Each record answered by the whole model and by the model without each perspective in turn: rows of
    `emollm_jax.predict.predict_records` with `removed` ("" for the whole model, else the perspective)."""
    from emollm_jax.predict import predict_records

    rows = []
    for removed in ("", *mvp_of(model).cfg.perspectives):
        m = without_perspective(model, removed) if removed else model
        for row in predict_records(config, workdir, records, data_root, model=m, tokenizer=tokenizer):
            rows.append({"removed": removed, **row})
    return rows
