"""Token merging inside a VLM's vision tower (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision images):
``vtprune.patch(llava, "tome", ratio=0.5)``.

A ViT method (``tome``, ``pitome``, ``zerotprune``; :mod:`vtprune.methods.vit`) runs between the blocks of the VLM's
CLIP / SigLIP tower, as on a plain ViT (:class:`vtprune.engine.vit.ViTSession`), and the reduced token set goes on to
the language model as the image's visual tokens. The engine sees it as a merging method at the vision entry:

* Budget: ``keep=N`` / ``ratio=r`` = the patch tokens **per crop** that reach the hidden state the projector reads
  (``vision_feature_layer``: -2 for LLaVA-1.5, i.e. the input of the last block; -1 for LLaVA-OneVision, the last
  block's output; the blocks from there on do not reduce). A CLS token is never merged; SigLIP has none, so every
  patch is mergeable (and the selection strategy must be ``'full'``).
* The tower's blocks follow each original patch to the token its content ends up in. The projector runs on the
  reduced tokens; its output is spread back over the crop's patch grid (every patch of a merged token carries the
  token's projected vector, a patch Zero-TPrune dropped carries zeros), so the host's placeholder count and the
  AnyRes packing (LLaVA-NeXT: reshape, unpad, newline column; LLaVA-OneVision: the same plus the bilinear downscale
  of large grids, ``anyres_max``) run unchanged.
* Each merged token then keeps one visual token. The adapter gives each visual token's blend of patches
  (``pack_crop_weights``: one patch with weight 1, except under OneVision's downscale, up to 2 x 2 bilinear taps);
  the *share* of a merged token in a visual token is the weight of its patches there, and the merged token keeps the
  visual token with its largest share; ties (always, without downscale: every share is 1) go to the one nearest the
  share-weighted centroid, then the first (:func:`vtprune.functional.vit.packed_representatives`; without downscale
  this is the member patch nearest to the members' centroid, :func:`~vtprune.functional.vit.group_representatives`).
  A kept token carries what the packing computed there: its merged token's vector, or under the downscale the blend
  of the merged tokens it overlaps (several may share it), divided by the weight of its patches that were not
  dropped (Zero-TPrune). The method returns those positions (plus the newline tokens, which are never dropped) as a
  :class:`~vtprune.methods.base.Selection`, so original position ids, left padding, batching, the KV cache, beam
  search and later points of a schedule (``fastv``...) work as for post-tower methods. A merged token none of whose
  patches reaches a visual token (LLaVA-NeXT's unpadded-away border) is dropped with them (the unpatched model drops
  those patches too).

Refused: a ``vision_feature_layer`` list (hidden states of several layers with different token counts cannot be
concatenated), a feature layer 0 (the embeddings: nothing to merge before it), a SigLIP tower read with strategy
``'default'`` (it would drop the first merged token), towers that are not CLIP / SigLIP, other families, and
LLaVA-OneVision videos (``get_video_features`` raises ``ValueError``: its frames are pooled after the projector).
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref

import torch

from ..adapters import tower_merging_families
from ..config import PruneConfig
from ..functional import vit as FV
from ..registry import spec_for_config
from .base import ImageInputs, Method, Selection
from .vit import ViTMethod

__all__ = ["TowerMerge"]

#: VLM families whose vision tower can merge tokens


class _UpToReadLayer(ViTMethod):
    """A ViT method on the blocks before the hidden state the projector reads (``read`` = its index: the output of
    block ``read - 1``). Its budget and its own per-layer options see a ``read + 1``-block ViT whose last block is
    the read layer; blocks from ``read`` on do not reduce (their output is not read)."""

    def __init__(self, method: ViTMethod, read: int):
        super().__init__(method.config)
        self.method, self.read = method, read
        self.name = method.name
        self.needs_attention = method.needs_attention

    @property
    def prop_attn(self) -> bool:
        return self.method.prop_attn

    def schedule(self, num_patches, num_blocks):
        out = list(self.method.schedule(num_patches, self.read + 1))[: self.read]
        return out + [0] * (num_blocks - len(out))

    def plan(self, index, num_blocks, r, metric, attn, protected):
        return self.method.plan(index, self.read + 1, r, metric, attn, protected)


class _Record:
    """What one image's tower pass left for the vision entry: the kept token indices (ascending, into the image's
    visual tokens), the factor each kept token's vector is divided by (None: all 1; see the module docstring) and the
    FLOPs the reduced tower and projector saved on its crops."""

    def __init__(self, kept: torch.Tensor, scale: torch.Tensor | None, saved_flops: int):
        self.kept, self.scale, self.saved_flops = kept, scale, saved_flops


class TowerMerge(Method):
    """A ViT method (``config``: a ``ToMeConfig`` / ``PiToMeConfig`` / ``ZeroTPruneConfig``) inside the vision tower of
    a LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision model; the vision-entry point of the patch (see the module
    docstring)."""

    stage = "vision"
    merges = True
    multi_crop = True
    signals = frozenset({"features"})
    kept_count = "own"  # the tower decided (a per-crop budget); select returns what it kept
    acts_in_tower = True

    def __init__(self, config: PruneConfig):
        super().__init__(config)
        spec = spec_for_config(config)  # by the config's type: a subclass of tome's config runs tome
        self.name = spec.name
        self.vit = spec.method_cls(config)
        self.session = None  # the ViTSession on the tower
        self.keeps_all = False
        self._records: dict[int, tuple[weakref.ref, _Record]] = {}
        self._in_call = False
        self._spread_rows = None
        self._reduced_tokens = 0

    # -- install ------------------------------------------------------------------------------------------------
    def install_in(self, adapter, hook, wrap) -> None:
        """Patch ``adapter``'s vision tower, projector and feature method (handles / wrapped methods go to the
        engine's ``hook`` / ``wrap``, which undo them on ``unpatch``)."""
        from ..adapters.vit import HFHost, find_vit_host
        from ..engine.vit import ViTSession

        config = adapter.config
        if not adapter.tower_merging:
            raise ValueError(
                f"merging inside the vision tower ({self.name!r}) supports {tower_merging_families()} "
                f"models, got model_type {config.model_type!r}"
            )
        tower = adapter.inner.vision_tower
        host = find_vit_host(tower)
        vtype = config.vision_config.model_type
        if not isinstance(host, HFHost) or vtype not in ("clip_vision_model", "clip", "siglip_vision_model"):
            raise ValueError(
                f"merging inside the vision tower ({self.name!r}) needs a CLIP or SigLIP vision tower; "
                f"this model's is {type(tower).__name__} ({vtype!r})"
            )
        layer = config.vision_feature_layer
        num_blocks = len(host.blocks)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(
                f"merging inside the vision tower needs one vision_feature_layer (int); this model "
                f"concatenates layers {layer!r}, whose token counts would differ after merging"
            )
        read = layer if layer >= 0 else num_blocks + 1 + layer
        if not 1 <= read <= num_blocks:
            raise ValueError(
                f"vision_feature_layer={layer} reads the patch embeddings (hidden state {read} of a "
                f"{num_blocks}-block tower): there is no block before it to merge tokens in"
            )
        self.strategy = config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.strategy!r} is not supported; 'default' or 'full'")
        if host.num_prefix == 0 and self.strategy != "full":
            raise ValueError(
                f"merging inside a SigLIP tower (no CLS token) needs vision_feature_select_strategy="
                f"'full'; {self.strategy!r} drops the first token, which would be a merged token"
            )
        self.adapter, self.host, self.read = adapter, host, read
        self.patches = host.num_patches()
        method = _UpToReadLayer(self.vit, read)
        schedule = method.schedule(self.patches, num_blocks)  # an unreachable budget fails here
        self.keeps_all = not any(schedule)
        self.session = ViTSession(tower, host, method, track_groups=True)
        self.session.install()
        hook(types.SimpleNamespace(remove=self.session.remove))
        hook(adapter.projector_module().register_forward_hook(self._spread))
        for name in adapter.feature_methods:
            if hasattr(adapter.inner, name):
                wrap(adapter.inner, name, functools.partial(self._wrapped_features, name=name))

    # -- inside get_image_features ----------------------------------------------------------------------------------
    def _wrapped_features(self, original, name):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if name != "get_image_features":
                raise ValueError(
                    f"{self.name!r} merges inside the vision tower of {self.adapter.config.model_type} "
                    f"images only; {name} (videos: each frame's grid is pooled bilinearly, "
                    "apply_pooling) is not supported: unpatch for videos, or use a post-tower method"
                )
            call = signature.bind(*args, **kwargs).arguments
            self._in_call, self._spread_rows = True, None
            try:
                out = original(*args, **kwargs)
            finally:
                self._in_call = False
            if self._spread_rows is not None:
                self._record(call, list(out.pooler_output))
            return out

        return wrapped

    def _spread(self, module, args, out):
        """Projector forward hook: ``[C, T, D]`` outputs of the reduced tokens -> ``[C, P (+1), D]`` over the crops'
        patch grids (each patch gets its token's vector; a dropped patch zeros)."""
        state = self.session.state if self.session is not None else None
        if not self._in_call or state is None or state.group is None or state.size is None or out.ndim != 3:
            return None  # not the feature call, or nothing merged
        group = state.group  # [C, P] slot in the read hidden state (CLS = slot 0), -1 dropped
        prefix = self.host.num_prefix
        t_read = int(group.max()) + 1 if bool((group >= 0).any()) else prefix
        c, t, d = out.shape
        if c != group.shape[0] or t not in (t_read, t_read - prefix):
            raise RuntimeError(
                f"the projector output {tuple(out.shape)} does not match the vision tower's "
                f"{group.shape[0]} crops of {t_read} tokens at the read layer"
            )
        offset = t_read - t  # the CLS rows the feature selection dropped
        spread = out.gather(1, (group - offset).clamp(min=0)[..., None].expand(c, group.shape[1], d))
        spread = spread.masked_fill((group < 0)[..., None], 0)
        rows = torch.cat([group.new_full((c, prefix - offset), -2), group], 1) if offset == 0 else group
        if offset == 0:
            spread = torch.cat([out[:, :prefix], spread], 1)
        self._spread_rows = rows  # [C, rows]: token slot of each row, -2 a prefix row (kept), -1 dropped
        self._reduced_tokens = t
        return spread

    def _record(self, call, feats) -> None:
        rows_all = self._spread_rows
        self._spread_rows = None
        self._records = {k: v for k, v in self._records.items() if v[0]() is not None}
        counts = self.adapter.crop_counts(call, len(feats))
        if sum(counts) != rows_all.shape[0]:
            raise RuntimeError(f"{rows_all.shape[0]} crops in the tower for images of {counts} crops")
        stats = self.session.stats
        tower_saved = (stats.flops_full - stats.flops) // max(stats.batch, 1) if stats is not None else 0
        proj_saved = self._projector_flops(rows_all.shape[1]) - self._projector_flops(self._reduced_tokens)
        for i, (feat, rows) in enumerate(zip(feats, torch.split(rows_all, counts))):
            crops, n_rows = rows.shape
            src, weight, pos = self.adapter.pack_crop_weights(call, i, crops, n_rows)  # [n, K]: rows, -1 none
            if src.shape[0] != feat.shape[0]:
                raise RuntimeError(f"image {i}: {feat.shape[0]} visual tokens but the packing maps {src.shape[0]}")
            src = src.to(rows.device)
            slot = torch.where(src >= 0, rows.reshape(-1)[src.clamp(min=0)], -3)  # -2 prefix row, -1 dropped
            members = torch.where(slot >= 0, torch.div(src, n_rows, rounding_mode="floor") * n_rows + slot, -1)
            weight = weight.to(rows.device)
            keep = FV.packed_representatives(members, weight, pos.to(rows.device))
            keep |= (src < 0).all(1) | (slot == -2).any(1)  # newline tokens and CLS rows stay
            survived = (slot >= 0) | (slot == -2)  # taps on a merged token or a CLS row (not on a dropped patch)
            alive = (weight * survived).sum(1) / weight.sum(1).clamp(min=1e-300)  # the part of its blend that survived
            kept = keep.nonzero().squeeze(1)
            scale = torch.where((src < 0).all(1), 1.0, alive)[kept]
            scale = None if bool((scale == 1).all()) else scale
            saved = crops * (tower_saved + proj_saved)
            self._records[id(feat)] = (weakref.ref(feat), _Record(kept, scale, saved))

    def _projector_flops(self, tokens: int) -> int:
        proj = self.adapter.projector_module()
        linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
        return sum(2 * tokens * m.in_features * m.out_features for m in linears)

    def record(self, feat: torch.Tensor | None) -> _Record | None:
        entry = self._records.get(id(feat)) if feat is not None else None
        return entry[1] if entry is not None and entry[0]() is feat else None

    # -- the vision entry -----------------------------------------------------------------------------------------
    def point_budget(self, n: int, n_original: int, layer: int, point) -> int:
        return n if self.keeps_all else n - 1  # the tower decided; select() returns what it kept

    def select(self, image: ImageInputs) -> Selection:
        record = self.record(image.features)
        if record is None:
            raise ValueError(
                f"{self.name!r} merges inside the vision tower: pass pixel_values so that the patched "
                "tower computes the image features (features computed elsewhere were not merged)"
            )
        kept = record.kept.to(image.features.device)
        merged = image.features[kept]
        if record.scale is not None:
            merged = (merged / record.scale.to(merged.device)[:, None]).to(merged.dtype)
        return Selection(kept=kept, merged=merged)

    def adjust_stats(self, stats, fwd) -> None:
        """Charge the tower and projector FLOPs the merging saved (the engine charges the unreduced tower)."""
        saved = 0
        for unit in fwd.units:
            record = self.record(unit.features)
            if record is not None and unit.present.numel() < unit.positions.numel():
                saved += record.saved_flops
        stats.prefill_flops -= saved
