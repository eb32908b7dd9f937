"""Pure tensor algorithms of vtprune: tensors in, tensors out; no model knowledge, no hooks.

Conventions shared by every function:

* indices are 0-based into the visual tokens of one image and returned as int64 on the input's
  device;
* ties go to the lower index;
* scores and similarities are computed in float32 (float64 when the input is float64), whatever
  the input dtype (bf16 / fp16 are upcast);
* "selection order" means the order in which a greedy algorithm picked the tokens (sort the
  result to keep tokens in their original order);
* bad input raises ``ValueError`` / ``TypeError`` naming what was given and what is allowed.

The exact math of each method, and the official code it follows, is in each docstring.
"""

from .baselines import cdpruner_relevance, cdpruner_select, pool_windows, vispruner_select
from .cluster import dbdpc_cluster, pact_merge
from .dart import dart_select
from .debias import debias_scores, fit_trend, pad_mask, trend_weights
from .diversity import kcenter_select, maxsum_select
from .holov import holov_select
from .idpruner import idpruner_select
from .merge import visionzip_select
from .pyramid import (
    dpc_knn_merge,
    pdrop_select,
    rope_gravity,
    sparsevlm_plus_attention,
    sparsevlm_rank_count,
    sparsevlm_raters,
    sparsevlm_select,
)
from .scores import cls_scores, received_attention, topk_indices
from .vit import (
    merge_tokens,
    pitome_margins,
    pitome_match,
    reduction_schedule,
    tome_match,
    tome_schedule,
    wpr_scores,
    zerotprune_match,
)
from .zoo import zoo_select, zoo_sensitivity, zoo_sensitivity_jvp

__all__ = [
    "cls_scores",
    "received_attention",
    "topk_indices",
    "dart_select",
    "kcenter_select",
    "maxsum_select",
    "pad_mask",
    "debias_scores",
    "trend_weights",
    "fit_trend",
    "zoo_sensitivity",
    "zoo_sensitivity_jvp",
    "zoo_select",
    "visionzip_select",
    "dbdpc_cluster",
    "pact_merge",
    "tome_match",
    "tome_schedule",
    "pitome_match",
    "pitome_margins",
    "wpr_scores",
    "zerotprune_match",
    "merge_tokens",
    "reduction_schedule",
    "vispruner_select",
    "cdpruner_select",
    "cdpruner_relevance",
    "pool_windows",
    "pdrop_select",
    "sparsevlm_raters",
    "sparsevlm_select",
    "sparsevlm_rank_count",
    "sparsevlm_plus_attention",
    "rope_gravity",
    "dpc_knn_merge",
    "holov_select",
    "idpruner_select",
]
