"""Every registered method on every family that takes videos, on a left-padded batch whose first row holds an image
and a video and whose second row a video alone, through a plain forward and through ``generate``.

Qwen3-VL / Qwen3.5's ``get_video_features`` returns ``self.get_image_features(...)``, and vtprune wraps both on the
instance: the wrappers must see only the outermost call (the video's features filed under the video token, the
vision signals of the video's call given to the method). Each row is checked against the unpatched model fed that
row's kept tokens at their original positions (vision-stage selections: the text model with the kept tokens'
features, and on Qwen3-VL their DeepStack rows; one decoder point: a layer-by-layer run that drops the unkept visual
tokens before layer K); merging and multi-point methods are checked for their counts and for ``generate`` agreeing
with the forward.
"""

import pytest
import torch
from conftest import MULTI_POINT_METHODS, budget, refused
from tiny import (
    _IMAGES,
    IMAGE_ID,
    PAD_ID,
    QWEN3,
    VEND_ID,
    VIDEO_ID,
    VSTART_ID,
    keep_columns,
    last_logits,
    layer_route,
    video_inputs,
)

import vtprune
from vtprune.registry import get_method

#: tiny.FAMILIES whose models take videos (``get_video_features``)
VIDEO_FAMILIES = ("llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", *QWEN3)
DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe")
ROWS = (("image", "video"), ("video",))  # the units of each batch row, in prompt order
KEEP = 4
#: where ``get_video_features`` calls ``get_image_features`` (Qwen3-VL with DeepStack, Qwen3.5 hybrid): every method
NESTED = ("qwen3_vl", "qwen3_5")
#: the other video families: each method on one of them, in turn (each family gets two or three methods)
OTHERS = tuple(f for f in VIDEO_FAMILIES if f not in NESTED)
#: LLaVA-OneVision's videos blend patches: methods that need one patch per token refuse them (test below)
VIDEO_REFUSALS = tuple(
    (m, "llava_onevision") for m in ("pool", "visionzip", "vispruner", "scope", "hiprune", "prumerge")
)
CASES = [
    (m, f)
    for i, m in enumerate(vtprune.list_methods(host="vlm", modality="image"))
    for f in (*NESTED, OTHERS[i % len(OTHERS)])
    if not refused(m, f) and (m, f) not in VIDEO_REFUSALS
]


def _units(model, family, seed=0):
    """Per unit of :data:`ROWS` (flattened), its kind, its number of tokens and its pixel inputs."""
    gen = torch.Generator().manual_seed(seed)
    qwen = family.startswith("qwen")
    units = []
    for i, kind in enumerate(k for row in ROWS for k in row):
        if kind == "image":
            extra = {"per_row": [1]} if family == "llava_onevision" else {}
            pix, (n,) = _IMAGES[family](model, 1, gen, **extra)
        elif qwen:  # 2 temporal patches of 4 x 6 patches: 2 frames of 6 tokens
            grid = torch.tensor([[2, 4, 6]])
            pix, n = dict(pixel_values_videos=torch.randn(48, 3 * 2 * 14 * 14, generator=gen), video_grid_thw=grid), 12
        else:
            pix, (n,) = video_inputs(model, frames=(2,), seed=seed + i)
        units.append((kind, n, pix))
    return units


def _counted(family, kind, n):
    """A unit's tokens as the engine counts them: LLaVA-OneVision's newline after a video is a structure token
    outside the unit (always kept)."""
    return n - (family == "llava_onevision" and kind == "video")


def _tokens(family, kind, n):
    """(ids, mm_token_type_ids) of one unit's placeholder block."""
    if not family.startswith("qwen"):
        return [IMAGE_ID if kind == "image" else VIDEO_ID] * n, [1 if kind == "image" else 2] * n
    if kind == "video" and family in QWEN3:  # per temporal patch: a timestamp, <vision_start>, its tokens, <vision_end>
        ids, types = [], []
        for t in range(2):
            ids += [11 + t, VSTART_ID] + [VIDEO_ID] * (n // 2) + [VEND_ID]
            types += [0, 0] + [2] * (n // 2) + [0]
        return ids, types
    token, type_ = (IMAGE_ID, 1) if kind == "image" else (VIDEO_ID, 2)
    return [VSTART_ID] + [token] * n + [VEND_ID], [0] + [type_] * n + [0]


def _assemble(family, rows, numbers):
    """Left-padded inputs of ``rows`` (each a list of ``(kind, n, pixels)`` units) with text around every unit (row
    number ``numbers[i]``'s own text, so a row alone is the same row)."""
    ids_rows, type_rows, pixels = [], [], {}
    for row, number in zip(rows, numbers):
        gen = torch.Generator().manual_seed(100 + number)
        ids, types = torch.randint(3, 80, (4,), generator=gen).tolist(), [0] * 4
        for kind, n, pix in row:
            block, block_types = _tokens(family, kind, n)
            more = torch.randint(3, 80, (2,), generator=gen).tolist()
            ids, types = ids + block + more, types + block_types + [0, 0]
            for key, value in pix.items():
                if key != "batch_num_images":
                    pixels.setdefault(key, []).append(value)
        ids_rows.append(ids)
        type_rows.append(types)
    width = max(map(len, ids_rows))
    out = dict(
        input_ids=torch.full((len(rows), width), PAD_ID), attention_mask=torch.zeros(len(rows), width, dtype=torch.long)
    )
    types = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, t) in enumerate(zip(ids_rows, type_rows)):
        out["input_ids"][i, width - len(r) :] = torch.tensor(r)
        out["attention_mask"][i, width - len(r) :] = 1
        types[i, width - len(r) :] = torch.tensor(t)
    out.update({key: torch.cat(values) for key, values in pixels.items()})
    if family == "llava_onevision" and "pixel_values" in out:
        out["batch_num_images"] = torch.tensor([sum(u[0] == "image" for u in row) for row in rows])
    if family.startswith("qwen"):
        out["mm_token_type_ids"] = types
    return out


def _batch_and_rows(model, family):
    units = iter(_units(model, family))
    rows = [[next(units) for _ in kinds] for kinds in ROWS]
    return (
        _assemble(family, rows, range(len(rows))),
        [_assemble(family, [row], [i]) for i, row in enumerate(rows)],
        rows,
    )


def _prompt(model, family, one):
    """Embeddings of one row with every unit's features in place, its positions, the visual mask and (Qwen3-VL)
    each DeepStack level's rows of the visual tokens in prompt order."""
    inner = model.model
    ids = one["input_ids"]
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids)
        visual = torch.isin(ids, torch.tensor([IMAGE_ID, VIDEO_ID]))
        if family == "llava_onevision" and bool((ids == VIDEO_ID).any()):  # the video's newline: text, kept
            visual[0, (ids[0] == VIDEO_ID).nonzero()[-1]] = False
        levels = None
        for token, key, grid in (
            (IMAGE_ID, "pixel_values", "image_grid_thw"),
            (VIDEO_ID, "pixel_values_videos", "video_grid_thw"),
        ):
            if key not in one:
                continue
            call = {k: one[k] for k in (grid, "image_sizes", "batch_num_images") if k in one}
            out = (inner.get_image_features if token == IMAGE_ID else inner.get_video_features)(one[key], **call)
            embeds[ids == token] = torch.cat(list(out.pooler_output))
            if family in DEEPSTACK:
                levels = levels or [
                    embeds.new_zeros(int(visual.sum()), embeds.shape[-1]) for _ in out.deepstack_features
                ]
                for level, feats in zip(levels, out.deepstack_features):
                    level[(ids == token)[visual]] = torch.cat(list(feats))
        if family.startswith("qwen"):
            pos, _ = inner.get_rope_index(
                ids,
                image_grid_thw=one.get("image_grid_thw"),
                video_grid_thw=one.get("video_grid_thw"),
                attention_mask=one["attention_mask"],
                mm_token_type_ids=one["mm_token_type_ids"],
            )
        else:
            pos = torch.arange(ids.shape[1])[None]
    return embeds, pos, visual, levels


def _vision_route(model, family, one, kept):
    """Last logits of the unpatched text model fed only the row's kept tokens, at their original positions."""
    embeds, pos, visual, levels = _prompt(model, family, one)
    keep = keep_columns(visual[0], kept)
    extra = {}
    if levels is not None:  # DeepStack: the kept tokens' rows of every level, the mask of the kept visual tokens
        extra = dict(visual_pos_masks=visual[:, keep], deepstack_visual_embeds=[lvl[kept] for lvl in levels])
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, keep],
            position_ids=pos[..., keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
            **extra,
        ).last_hidden_state
        return model.lm_head(hidden[:, -1]).float()


@pytest.mark.parametrize("method,family", CASES)
def test_method_on_videos_alone_and_beside_an_image(method, family, model_factory):
    model = model_factory(family)
    batch, singles, rows = _batch_and_rows(model, family)
    cls = get_method(method).method_cls
    with vtprune.patched(model, method, **budget(method, KEEP)):
        logits = last_logits(model, batch)
        st = vtprune.stats(model)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        st_generate = vtprune.stats(model)
    # one budget per unit: the image and the video of row 0, the video of row 1
    assert st.visual_tokens_in == [sum(_counted(family, k, n) for k, n, _ in row) for row in rows]
    if method not in MULTI_POINT_METHODS:
        assert st.visual_tokens_kept == [KEEP * len(row) for row in rows]
        for kept, row in zip(st.kept_indices, rows):
            ends = torch.tensor([_counted(family, k, n) for k, n, _ in row]).cumsum(0)
            assert torch.bucketize(kept, ends, right=True).bincount(minlength=len(row)).tolist() == [KEEP] * len(row)
    # generate (which may compute the features before the forward) selects the same tokens, with the same logits
    assert [k.tolist() for k in st_generate.kept_indices] == [k.tolist() for k in st.kept_indices]
    torch.testing.assert_close(out.logits[0].float(), logits, rtol=1e-4, atol=1e-4)
    late = st.late_dropped is not None and any(st.late_dropped)
    for row, one in enumerate(singles):
        kept = st.kept_indices[row]
        if cls.stage == "vision" and not cls.merges and not late:
            ref = _vision_route(model, family, one, kept)
        elif cls.stage == "llm" and not cls.merges and method not in MULTI_POINT_METHODS:
            ref = layer_route(model, _prompt(model, family, one), kept, st.layer)
        else:  # merged vectors, late drops, several points: their own tests; here the counts and generate above
            continue
        torch.testing.assert_close(logits[row], ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [m for m, f in VIDEO_REFUSALS])
def test_methods_needing_one_patch_per_token_refuse_onevision_videos(method, model_factory):
    """LLaVA-OneVision pools each frame bilinearly: a video token blends patches (docs/models.md, LLaVA video table)."""
    model = model_factory("llava_onevision")
    batch, _, _ = _batch_and_rows(model, "llava_onevision")
    with vtprune.patched(model, method, **budget(method, KEEP)), pytest.raises(ValueError, match="blend"):
        last_logits(model, batch)
