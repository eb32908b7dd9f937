"""The pruning engine: the hooks one ``patch`` installs on one model instance, split by responsibility.

* :mod:`.session` — install / remove, and the flow of one forward pass, top to bottom (start there);
* :mod:`.capture` — vision-side capture: features, CLS rows, vision keys, projector inputs per image;
* :mod:`.units` — each image's / video's visual tokens in the prompt, and what each point kept of them;
* :mod:`.points` — prune points (vision entry, decoder layer K, late drop): signals, selection, compaction, the
  masks and positions of the layers after a point, in prefill and in continuations;
* :mod:`.layout` — compactions and the bookkeeping a pruned prompt leaves on its KV cache;
* :mod:`.stats` — ``PruneStats`` (per point and overall, FLOPs of every point).
"""

from .layout import Layout, PrunedPrompt, pruned_prompt
from .session import Session, build_points

__all__ = ["Session", "Layout", "PrunedPrompt", "pruned_prompt", "build_points"]
