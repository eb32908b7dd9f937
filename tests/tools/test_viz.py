"""vtprune.viz: kept-token overlays."""

import pytest
from PIL import Image

from vtprune import viz


def _image():
    im = Image.new("RGB", (64, 48), (200, 200, 200))
    im.paste((255, 0, 0), (0, 0, 8, 8))
    return im


def test_overlay_darkens_dropped_patches_and_keeps_kept_ones():
    out = viz.overlay(_image(), [0, 5], grid=4, size=32)
    assert out.size == (32, 32)
    inside_kept = out.getpixel((3, 3))  # patch 0 (8x8 px), interior: untouched
    dropped = out.getpixel((12, 3))  # patch 1: darkened grey
    assert inside_kept[0] > 150 and dropped == (50, 50, 50)
    assert out.getpixel((8 * 1 + 3, 8 * 1 + 3)) != (50, 50, 50)  # patch 5 = row 1, col 1: kept


def test_processed_view_is_a_centre_crop():
    view = viz.processed_view(_image(), 24)
    assert view.size == (24, 24)


def test_compare_sheet_and_errors():
    sheet = viz.compare(_image(), {"a": [0, 1], "b": [2]}, grid=4, size=32)
    assert sheet.width > 2 * 64 and sheet.height > 64
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        viz.overlay(_image(), [16], grid=4)
    with pytest.raises(ValueError, match="kept_by_method is empty"):
        viz.compare(_image(), {}, grid=4)
    with pytest.raises(TypeError, match="PIL.Image"):
        viz.overlay("x.png", [0], grid=4)


def test_compare_wraps_into_rows_of_columns():
    kept = {name: [0] for name in "abcde"}
    one_row = viz.compare(_image(), kept, grid=4, size=32, scale=1)
    rows = viz.compare(_image(), kept, grid=4, size=32, scale=1, columns=2)  # 3 rows: 2 + 2 + 1
    pad, title = 6, 16
    assert one_row.size == (5 * (32 + pad) + pad, 32 + title + 2 * pad)
    assert rows.size == (2 * (32 + pad) + pad, 3 * (32 + title + pad) + pad)
    assert (
        viz.compare(_image(), kept, grid=4, size=32, columns=9).size
        == viz.compare(_image(), kept, grid=4, size=32).size
    )
    with pytest.raises(ValueError, match="columns must be None or an int >= 1"):
        viz.compare(_image(), kept, grid=4, columns=0)


def test_a_merged_token_is_drawn_as_the_region_it_covers():
    # patch 0 carries patches 1, 4 and 5 (a 2x2 block); patch 10 is kept alone; the rest is dropped
    merged_into = [-1] * 16
    for i in (0, 1, 4, 5):
        merged_into[i] = 0
    merged_into[10] = 10
    out = viz.overlay(_image(), [0, 10], grid=4, size=32, merged_into=merged_into)
    plain = viz.overlay(_image(), [0, 10], grid=4, size=32)
    member = (8 + 3, 8 + 3)  # patch 5's interior
    assert plain.getpixel(member) == (50, 50, 50)  # anchor cells only: the member looks dropped
    assert out.getpixel(member) == (200, 200, 200)  # the region: the member is covered, not darkened
    assert out.getpixel((7, 12)) == out.getpixel((8, 12)) == (200, 200, 200)  # patches 4 | 5: one region, no line
    assert out.getpixel((15, 12)) == (255, 200, 0)  # the region's right edge (patch 5's right side) is outlined
    assert out.getpixel((8 * 3 + 3, 3)) == (50, 50, 50)  # patch 3: dropped
    with pytest.raises(ValueError, match="one entry per patch"):
        viz.overlay(_image(), [0], grid=4, merged_into=[0] * 5)


def test_pool_stats_draw_its_blocks(model_factory):
    """A merging method's PruneStats: each original token's carrier is a kept token (pool: its block), and compare
    draws every covered patch bright (not only the kept anchors)."""
    import torch
    from tiny import make_inputs

    import vtprune

    model = model_factory("llava")
    x = make_inputs(model, "llava", [(6, 1, 4)])
    with vtprune.patched(model, "pool", keep=4), torch.no_grad():
        model(**x)
        st = vtprune.stats(model)
    n = st.visual_tokens_in[0]
    carriers = st.merged_into[0]
    kept = st.kept_indices[0]
    assert carriers.shape == (n,) and set(carriers.unique().tolist()) <= set(kept.tolist()) | {-1}
    assert (carriers[kept] == kept).all() and int((carriers >= 0).sum()) > kept.numel()
    assert "merged_into=<1 of 1 samples merged>" in repr(st)
