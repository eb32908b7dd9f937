"""The pruning engine: the hooks one ``patch`` installs on one model instance, split by responsibility.

* :mod:`.session` — install / remove, and the flow of one forward pass, top to bottom (start there);
* :mod:`.plan` — the frozen :class:`~.plan.Plan` binding methods to a model: prune points, budgets, signal layers;
* :mod:`.forward` — the records of one forward: current sequence, layer K-1 capture, point signals, overrides;
* :mod:`.capture` — vision-side capture: features, CLS rows, vision keys, projector inputs per image;
* :mod:`.units` — each image's / video's visual tokens in the prompt, and what each point kept of them;
* :mod:`.inputs` — the one builder of method inputs (vision entry and decoder points);
* :mod:`.scoring` — a decoder point's signals (captured q/k of layer K-1, or layer K's own attention);
* :mod:`.points` — selection, merging and compaction at a point; late drops;
* :mod:`.layers` — masks and rotary tables of the layers after a point, in prefill and in continuations;
* :mod:`.layout` — compactions and the bookkeeping a pruned prompt leaves on its KV cache;
* :mod:`.host` — the host's calls around a forward (generate's prompt, the loss's labels); :mod:`.hooks` — what
  one patch installed, for ``remove``;
* :mod:`.stats` — ``PruneStats`` (per point and overall, FLOPs of every point).
"""

from .layout import Layout, PrunedPrompt, pruned_prompt
from .plan import Plan, PrunePoint, bind, build_points
from .session import Session

__all__ = ["Session", "Layout", "PrunedPrompt", "pruned_prompt", "build_points", "bind", "Plan", "PrunePoint"]
