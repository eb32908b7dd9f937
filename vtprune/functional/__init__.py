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

The exact math of each method, and the official code it follows, is in each docstring. A method's math lives in the
module named after it (``cdpruner``, ``dart``, ``pact``, ``pdrop``, ``pool``, ``sparsevlm``, ``visionzip``,
``vispruner``, ``zoo``; ``vit``: the ViT-host methods tome, pitome, zerotprune); what several methods share has a
module named for what it is: ``scores`` (attention-derived scores, top-k), ``diversity`` (greedy k-center / max-sum),
``debias`` (the debiasing option: padding masks, recency trends), ``rope`` (the RoPE-only gravity term), ``_common``
(private: input checks, the compute-dtype rule, cosine rows, tie-breaking top-k).
"""

from .cdpruner import cdpruner_relevance, cdpruner_select
from .dart import dart_select
from .debias import debias_scores, fit_trend, pad_mask, trend_weights
from .diversity import kcenter_select, maxsum_select
from .hiprune import hiprune_anchor_count, hiprune_select
from .holov import holov_select
from .idpruner import idpruner_select
from .pact import dbdpc_cluster, pact_merge
from .pdrop import pdrop_select
from .pool import pool_windows
from .prumerge import prumerge_attention, prumerge_count, prumerge_merge, prumerge_select
from .rope import rope_gravity
from .scope import scope_select
from .scores import cls_scores, received_attention, topk_indices
from .sparsevlm import (
    dpc_knn_merge,
    sparsevlm_plus_attention,
    sparsevlm_rank_count,
    sparsevlm_raters,
    sparsevlm_select,
)
from .visionzip import visionzip_select
from .vispruner import vispruner_select
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

# isort: split
# video methods (one video per call, flat index t * N + i)
from .evs import evs_select
from .fastvid import fastvid_frame_attention, fastvid_select
from .flashvid import flashvid_frame_tokens, flashvid_select
from .frame_budget import frame_budgets
from .vidcom2 import vidcom2_select
from .video import dpc_knn_scores, dyseg_segments, frame_similarity

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
    "prumerge_select",
    "prumerge_attention",
    "prumerge_count",
    "prumerge_merge",
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
    # video methods
    "evs_select",
    "vidcom2_select",
    "frame_budgets",
    "fastvid_select",
    "fastvid_frame_attention",
    "flashvid_select",
    "flashvid_frame_tokens",
    "dyseg_segments",
    "frame_similarity",
    "dpc_knn_scores",
    "scope_select",
    "hiprune_select",
    "hiprune_anchor_count",
    "holov_select",
    "idpruner_select",
]
