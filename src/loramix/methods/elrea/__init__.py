"""ELREA: ensembles of low-rank expert adapters chosen by gradient direction (Li, Gao, Zhang, Torkamani, ICLR 2025,
arXiv 2502.00089).

The pipeline, and the part of this package behind each step:

1. Train a base LoRA adapter on all the data (the trainer; one expert, router "none").
2. Represent every training example by the direction of its loss gradient w.r.t. the base adapter
   (:class:`GradientFeaturizer`). For an adapted layer y = W0 x + s B A x with h_t = A x_t and
   delta_t = dL/dy_t, the per-example gradients are

       dL/dB = s * sum_t delta_t h_t^T,      dL/dA = s * sum_t (B^T delta_t) x_t^T,

   exact for every example of a batch from one backward pass of the summed per-sample losses. Optionally each
   gradient g becomes one Adam step from the base adapter's optimizer state (m, v), as in LESS:
   m' / sqrt(v' + eps) with m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2. The loss is label-free for
   consistency with test time: the prompt tokens only for causal LMs (:func:`prompt_lm_loss`), the model's own
   predicted label for classifiers (:func:`self_label_cross_entropy`).
3. Sketch the gradients to k dimensions (:class:`CountSketch`: a seeded sparse sign hash per parameter, never a
   dense P x k matrix), sum over layers and L2-normalise: f in R^k, |f| = 1. For classifiers, optionally map f
   to a sign-invariant feature (:class:`SignInvariantMap`, `sign_invariant=True`, what `method: elrea` does):
   the self-label gradient flips sign with the predicted class, so signed directions split a task by class.
4. Cluster the training features by direction (:func:`cluster_features`: k-means on unit vectors or BIRCH, the
   number of clusters C by cosine silhouette when not given). Centroids mu_c are normalised cluster means.
5. Train expert c + 1 on cluster c, starting from the base adapter, in one bank of C + 1 experts routed by task id
   (:func:`init_experts_from_base`, :func:`cluster_task_ids`; the trainer runs the training). Expert 0 stays
   the frozen base adapter, whose centroid mu_0 is the normalised mean of all training features
   (:func:`base_centroid`).
6. At inference, featurize the test input with the base adapter (expert 0), weight the experts by

       c_e = cos(f, mu_e),   w = softmax(((c - mean(c)) / std(c)) / temperature)     over e = 0..C

   (:func:`routing_weights`), and combine the experts' logits, sum_e w_e logits_e, in one forward pass over the
   batch replicated C + 1 times (:func:`ensemble_logits`; or route each input to argmax_e w_e with
   `mode="top1"`).

Example:
    >>> from loramix.methods import elrea
    >>> featurizer = elrea.GradientFeaturizer(base_model, projection_dim=2048, seed=0)
    >>> def loss(b):
    ...     logits = base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ...     return elrea.prompt_lm_loss(logits, b["input_ids"], b["prompt_mask"])
    >>> train_feats = featurizer.featurize(loader, loss)  # (N, 2048)
    >>> clusters = elrea.cluster_features(train_feats, seed=0)  # C by silhouette; train expert c + 1 on cluster c
    >>> w = elrea.routing_weights(test_feats, clusters.centroids, base_centroid=elrea.base_centroid(train_feats))
    >>> logits = elrea.ensemble_logits(elrea.routed_forward(bank_model), test_inputs, w)
"""

from loramix.methods.elrea.cluster import Clustering, cluster_centroids, cluster_features
from loramix.methods.elrea.ensemble import (
    base_centroid,
    ensemble_logits,
    replicate_batch,
    routed_forward,
    routing_weights,
)
from loramix.methods.elrea.experts import cluster_task_ids, init_experts_from_base
from loramix.methods.elrea.features import (
    GradientFeaturizer,
    adam_state_by_name,
    causal_lm_loss,
    label_averaged_features,
    prompt_lm_loss,
    self_label_cross_entropy,
)
from loramix.methods.elrea.model import (
    ElreaModel,
    classifier_self_label_loss,
    expand_to_bank,
    lm_prompt_loss,
)
from loramix.methods.elrea.projection import CountSketch, SignInvariantMap, project_gradients

__all__ = [
    "Clustering",
    "CountSketch",
    "ElreaModel",
    "GradientFeaturizer",
    "SignInvariantMap",
    "adam_state_by_name",
    "base_centroid",
    "causal_lm_loss",
    "classifier_self_label_loss",
    "cluster_centroids",
    "cluster_features",
    "cluster_task_ids",
    "ensemble_logits",
    "expand_to_bank",
    "init_experts_from_base",
    "label_averaged_features",
    "lm_prompt_loss",
    "project_gradients",
    "prompt_lm_loss",
    "replicate_batch",
    "routed_forward",
    "routing_weights",
    "self_label_cross_entropy",
]
