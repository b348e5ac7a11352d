"""BiLRP: explain a dot-product similarity y(x, x') = <phi(x), phi(x')> as relevance over pairs of features.

Eberle et al. 2020 (arXiv 2003.05431) show that the second-order deep Taylor decomposition of a
similarity built on an embedding phi is a composition of ordinary LRP passes:

    R_{ii'} = sum_m R_i(phi_m; x) * R_{i'}(phi_m; x')

where R_i(phi_m; x) is the LRP explanation of the single embedding output phi_m(x). The explainer
computes all the passes for the m's at once: the input is repeated once per seed along the batch
axis and each copy's output is seeded with its one-hot (zennit's rules act per batch element), so a
chunk of seeds costs one forward and one backward through the model with zennit's LRP rules hooked
on its modules; the Linear/Conv rules run through ``prepare.DirectRule`` (zennit's rule without the
ordinary backward zennit computes underneath it, the layer's forward on the distinct example only).
Optionally phi is first reduced by a low-rank projection (k seeds instead of dim(phi)); the pair
matrix is pooled to image patches or text tokens. Any ``nn.Module`` torch.fx can trace is accepted
(torchvision's VGG and ResNet as shipped, residual blocks, functional activations).

Modules, one job each:

- ``explainer``: ``BiLRP`` (the passes and their product), ``explain_pair`` (the server hook),
  ``pca_projection`` and ``penultimate_embedding``;
- ``prepare``: tracing the model, rewriting the calls whose gradient is not their LRP rule into
  hookable modules, folding BatchNorm, and the zennit rule of every module (``DirectRule``);
- ``options``: the checks of the explainer's options (shared with the test reference);
- ``result``: ``BiLRPResult`` (pair matrix, pooled matrix, top pairs, ``to_explanation()``);
- ``plot``: ``plot_pair``, the paper's pair figure.

LRP rules (Montavon et al. 2019, "Layer-wise relevance propagation: an overview") for the
Linear/Conv layers (the other layers' rules are listed in ``prepare``):

- ``"zero"``: LRP-0, R_i = sum_j a_i w_ij / z_j R_j (conservative on bias-free ReLU nets);
- ``"epsilon"``: z_j + eps * sign(z_j) in the denominator (absorbs weak/contradictory relevance);
- ``"gamma"``: weights w + gamma * w^+ (favours positive contributions; for lower layers);
- ``"zb"``: the z^B rule for the input layer, with input bounds (low, high) (pixel ranges).
"""

from __future__ import annotations

from explainers.bilrp.explainer import BiLRP, explain_pair, pca_projection, penultimate_embedding
from explainers.bilrp.plot import plot_pair
from explainers.bilrp.options import RULES
from explainers.bilrp.result import BiLRPResult

__all__ = ["BiLRP", "BiLRPResult", "explain_pair", "plot_pair", "pca_projection", "penultimate_embedding", "RULES"]
