"""Plot styles: every series distinguishable in colour and in print, the legend beside the data."""

import pytest

from vtprune.plotstyle import legend_beside, series_styles


def test_forty_series_differ_in_colour_and_in_print():
    styles = series_styles(f"m{i}" for i in range(40))
    triples = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    grey = {(s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(triples) == len(grey) == 40
    assert list(styles) == [f"m{i}" for i in range(40)]
    # neighbours in the list (the demo's 15 methods) differ in all three within a block of ten
    assert styles["m0"]["color"] != styles["m10"]["color"] or styles["m0"]["marker"] != styles["m10"]["marker"]


def test_repeated_labels_keep_their_first_style_and_too_many_raise():
    styles = series_styles(["a", "b", "a"])
    assert list(styles) == ["a", "b"]
    with pytest.raises(ValueError, match="41 series"):
        series_styles(str(i) for i in range(41))


def test_legend_is_outside_every_panel():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    styles = series_styles(f"m{i}" for i in range(20))
    for i, (label, style) in enumerate(styles.items()):
        axes[i % 2].plot([0, 1], [i, i + 1], label=label, **style)
    legend_beside(list(axes))
    fig.canvas.draw()
    legend = axes[-1].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert sorted(texts) == sorted(styles) and len(texts) == 20  # each label once, panel after panel
    box = legend.get_window_extent()
    for ax in axes:
        assert not box.overlaps(ax.get_window_extent())
    plt.close(fig)
