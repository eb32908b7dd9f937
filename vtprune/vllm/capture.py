"""What the plugin reads from inside vLLM's vision tower while it runs (step 3 of :mod:`vtprune.vllm.qwen_vl`): the
patch merger's input per merged token (``projector_inputs``) and, for ``importance="received"``, the attention each
patch receives in the method's vision blocks with their head-mean keys, from the queries and keys vLLM's attention
kernel gets; each split per item in the processor's token order (Qwen2.5-VL's window order undone with
:func:`vtprune.adapters.qwen_grid.undo_window_order`, as the Hugging Face adapter does). No vLLM import.
"""

from __future__ import annotations

import contextlib

import torch

from ..adapters import qwen_grid


class Capture:
    """The capture part of the pruning model classes (a mixin before vLLM's model class; it reads
    ``_needs_projector`` / ``_needs_received``, ``_received_layers`` and ``vtprune_method`` of
    :class:`vtprune.vllm.pruning.Pruning`)."""

    # -- the merger's input per token ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _capture_merger_inputs(self, into: list):
        if not self._needs_projector():
            yield
            return
        # vLLM's compile decorator calls ``self.forward`` directly (module hooks do not run): wrap the instance's
        # forward for the duration of the call
        merger = self.visual.merger
        original = merger.forward

        def forward(x, *args, **kwargs):
            into.append(x.detach())
            return original(x, *args, **kwargs)

        merger.forward = forward
        try:
            yield
        finally:
            del merger.forward

    def _merger_token_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merged-token order of the merger's input rows -> prompt order (None: the same)."""
        return None

    # -- the attention each patch receives (importance="received") ------------------------------------------------
    def _attention_blocks(self, grid: list[list[int]], layer: int) -> torch.Tensor:
        """``[B + 1]`` int64 boundaries of the blocks of patches that attend among themselves in vision block
        ``layer`` for a tower call on ``grid`` (in the tower's token order): one per frame. Computed from the grid,
        not read from the call: some attention backends (FlashInfer) receive the boundaries rescaled."""
        frames = [h * w for t, h, w in grid for _ in range(t)]
        return torch.tensor([0] + frames).cumsum(0)

    @contextlib.contextmanager
    def _capture_received(self, grid: list[list[int]], into: dict):
        """While the vision tower runs on ``grid``: for each of the method's vision blocks, the attention each patch
        receives (``into[layer] = [N]``, the method's ``received_attention``, by default
        ``vtprune.functional.received_attention``, of the queries and keys the
        block's attention kernel gets, after vLLM's rotary embedding) and the head-mean keys (``into[("keys",
        layer)] = [N, Dh]``), in the tower's token order."""
        if not self._needs_received():
            yield
            return
        modules = []
        for layer in self._received_layers:
            kernel = self.visual.blocks[layer].attn.attn  # vLLM's MMEncoderAttention: q/k after the rotary embedding
            original = kernel.forward
            blocks = self._attention_blocks(grid, layer)

            def forward(*args, _layer=layer, _kernel=kernel, _original=original, _blocks=blocks, **kwargs):
                q = kwargs["query"] if "query" in kwargs else args[0]
                k = kwargs["key"] if "key" in kwargs else args[1]
                if q.dim() != 4 or q.shape[0] != 1 or k.shape[:2] != q.shape[:2]:
                    raise RuntimeError(
                        f"vtprune.vllm: vision block {_layer}'s attention got queries of shape "
                        f"{tuple(q.shape)} and keys {tuple(k.shape)}; expected [1, N, H, Dh]"
                    )
                if _layer in into:
                    raise RuntimeError(f"vtprune.vllm: vision block {_layer} ran twice in one tower call")
                reduce = self.vtprune_method.received_attention  # the method's reduction (default: received)
                into[_layer] = reduce(q[0], k[0], _blocks.to(q.device), float(_kernel.scale))
                into[("keys", _layer)] = k[0].detach().mean(1)
                return _original(*args, **kwargs)

            kernel.forward = forward
            modules.append(kernel)
        try:
            yield
        finally:
            for kernel in modules:
                del kernel.forward

    def _split_received(self, into: dict, grid_thw: torch.Tensor, patches: list[int]):
        """Per item ``([1, L, P], [1, L, P, Dh])``: received attention and head-mean keys of the method's layers,
        each item's ``P`` patches in the processor's order (merge unit by merge unit), as vtprune's Hugging Face
        path hands them (``ImageInputs.received`` / ``vision_keys``)."""
        if not self._needs_received():
            return [(None, None)] * len(patches)
        missing = [layer for layer in self._received_layers if layer not in into]
        if missing:
            raise RuntimeError(
                f"vtprune.vllm: vision block(s) {missing} did not run their attention kernel (a "
                "compiled or CUDA-graphed vision encoder hides it)"
            )
        unit = self.visual.spatial_merge_unit
        order = self._merger_token_order(grid_thw)
        per_layer = []
        for layer in self._received_layers:
            scores, keys = into[layer], into[("keys", layer)]
            if order is not None:  # the tower holds merge units in window order: back to the processor's order
                scores = qwen_grid.undo_window_order(scores, order, unit)
                keys = qwen_grid.undo_window_order(keys, order, unit)
            per_layer.append((torch.split(scores, patches), torch.split(keys, patches)))
        out = []
        for i in range(len(patches)):
            received = torch.stack([scores[i] for scores, _ in per_layer]).unsqueeze(0)  # [1, L, P]
            keys = torch.stack([keys[i] for _, keys in per_layer]).unsqueeze(0)  # [1, L, P, Dh]
            out.append((received, keys))
        return out

    def _split_projector_inputs(self, captured: list, grid_thw: torch.Tensor, sizes: list[int]):
        if not self._needs_projector():
            return [None] * len(sizes)
        if len(captured) != 1:
            raise RuntimeError(
                f"vtprune.vllm: the patch merger ran {len(captured)} times for one batch of items; "
                "expected once (a compiled vision encoder, compile_mm_encoder, hides its input)"
            )
        unit = self.visual.spatial_merge_unit
        tokens = qwen_grid.pack_merge_units(captured[0], unit)
        order = self._merger_token_order(grid_thw)
        if order is not None:
            tokens = qwen_grid.undo_window_order(tokens, order)
        return list(torch.split(tokens, sizes))

    # -- the tower's run on a batch of items --------------------------------------------------------------------
    def _items(self, modality: str, inputs):
        """The items' projected tokens, and per item the merger's input and the (received attention, keys)."""
        captured: list = []
        attention: dict = {}
        grid = inputs[f"{modality}_grid_thw"]
        with self._capture_merger_inputs(captured), self._capture_received(grid.tolist(), attention):
            if modality == "image":
                embeds = self._process_image_input(inputs)
            else:
                embeds = self._process_video_input(inputs)
        sizes = [e.shape[0] for e in embeds]
        received = self._split_received(attention, grid, [n * self.visual.spatial_merge_unit for n in sizes])
        return embeds, list(zip(self._split_projector_inputs(captured, grid, sizes), received))
