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
