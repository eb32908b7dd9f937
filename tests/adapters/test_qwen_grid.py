"""Qwen's grid helpers (vtprune/adapters/qwen_grid.py): one module that the Hugging Face adapter and the vLLM plugin
both use, checked against the unpatched model's own vision tower and against hand-written reference steps; and the
vLLM plugin's modules stay small. Runs in vtprune's own venv (no vLLM: the plugin's modules that import vLLM are read
as source)."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune.adapters import get_adapter, qwen_grid
from vtprune.adapters import qwen_vl as hf_qwen

VLLM = Path(__file__).resolve().parents[2] / "vtprune" / "vllm"
#: what qwen_grid owns; no module of vtprune/vllm/ may define its own copy of these
GRID_NAMES = {
    "pack_merge_units",
    "pool_merge_units",
    "token_patches",
    "window_order_inverse",
    "undo_window_order",
    "grid_positions",
    "merger_parts",
    "PerTokenMerger",
    "_MergerPerToken",
}


def _image_grids():
    return torch.tensor([[1, 8, 12], [1, 12, 8]])  # Qwen2.5-VL tiny: 2x2-token windows, so the order is permuted


def _pixels(grid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=gen)


# -- one module ---------------------------------------------------------------------------------------------------
def test_vllm_modules_stay_under_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in VLLM.glob("*.py")}
    assert {"qwen_vl.py", "sizing.py", "capture.py", "positions.py", "pruning.py"} <= set(sizes)
    assert all(n < 400 for n in sizes.values()), sizes


def test_adapter_and_vllm_plugin_use_the_one_grid_module():
    # the adapter's helpers are qwen_grid's objects
    assert hf_qwen.qwen_grid is qwen_grid
    assert not hasattr(hf_qwen, "_MergerPerToken")
    # the plugin's vLLM-free modules import them (the same objects) ...
    from vtprune.vllm import capture, positions

    assert positions.grid_positions is qwen_grid.grid_positions
    assert capture.qwen_grid is qwen_grid
    # ... and no module of the plugin defines its own copy; those that need the grid import it from qwen_grid
    users = set()
    for path in VLLM.glob("*.py"):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & GRID_NAMES, (path.name, defined & GRID_NAMES)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                if node.module == "adapters.qwen_grid" or (
                    node.module == "adapters" and any(a.name == "qwen_grid" for a in node.names)
                ):
                    users.add(path.name)
    assert {"capture.py", "positions.py", "pruning.py", "qwen_vl.py"} <= users


# -- merge units and window order, against the tower ----------------------------------------------------------------
def test_merger_inputs_packed_and_unwindowed_give_the_towers_output(model_factory):
    """Qwen2.5-VL runs its merger in window order: the merger's captured input, packed per token, put back in the
    processor's order and fed to the per-token merger, reproduces the tower's own output (which undoes the window
    order itself), row for row; without the undo it does not."""
    model = model_factory("qwen2_5_vl")
    adapter = get_adapter(model)
    grid = _image_grids()
    captured = []
    hook = model.model.visual.merger.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = torch.cat(model.model.get_image_features(_pixels(grid), grid).pooler_output)
    finally:
        hook.remove()
    unit = model.model.visual.spatial_merge_size**2
    window = adapter._window_index(grid)
    assert not torch.equal(window, torch.arange(window.numel()))  # the order is really permuted
    tokens = qwen_grid.pack_merge_units(captured[0], unit)
    merger = adapter.projector()
    assert isinstance(merger, qwen_grid.PerTokenMerger)
    with torch.no_grad():
        unwindowed = merger(qwen_grid.undo_window_order(tokens, qwen_grid.window_order_inverse(window)))
        windowed = merger(tokens)
    torch.testing.assert_close(unwindowed, out, rtol=0, atol=1e-6)
    assert not torch.allclose(windowed, out, atol=1e-3)
    # per patch (unit rows per token): the same permutation, unit by unit
    patches = captured[0]
    per_patch = qwen_grid.undo_window_order(patches, qwen_grid.window_order_inverse(window), unit)
    torch.testing.assert_close(qwen_grid.pack_merge_units(per_patch, unit), tokens[torch.argsort(window)])


def test_undo_window_order_inverts_the_towers_permutation():
    # the tower permutes merge units with window_index (transformers modeling_qwen2_5_vl.py,
    # permute_input_for_window_attn: input[window_index]); the undo brings back the processor's order
    gen = torch.Generator().manual_seed(1)
    window = torch.randperm(12, generator=gen)
    rows = torch.randn(12 * 4, 3, generator=gen)
    windowed = rows.reshape(12, 4, 3)[window].reshape(48, 3)
    assert torch.equal(qwen_grid.undo_window_order(windowed, qwen_grid.window_order_inverse(window), 4), rows)
    assert torch.equal(qwen_grid.undo_window_order(windowed.reshape(12, 12), torch.argsort(window)), rows.view(12, 12))


def test_pool_merge_units_means_each_tokens_patches():
    scores = torch.arange(24.0).reshape(1, 24)
    expected = torch.tensor([sum(range(4 * i, 4 * i + 4)) / 4 for i in range(6)])
    assert torch.equal(qwen_grid.pool_merge_units(scores, 6, 4), expected)
    assert torch.equal(qwen_grid.pool_merge_units(scores[:, :6], 6, 4), scores[0, :6])  # per token: as they are
    with pytest.raises(ValueError, match=r"fit neither the 24 patches nor the 6 tokens of image 2"):
        qwen_grid.pool_merge_units(scores[:, :10], 6, 4, "image 2")
    assert qwen_grid.token_patches(2, 8, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_grid_positions_number_tokens_as_t_h_w():
    pos = qwen_grid.grid_positions(2, 2, 3, t_factor=2.5)
    expected = [[int(t * 2.5), h, w] for t in range(2) for h in range(2) for w in range(3)]
    assert pos.T.tolist() == expected and pos.dtype == np.int64


# -- the per-token merger -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_per_token_merger_is_the_merger_and_its_float32_copy_matches(family, model_factory):
    """``PerTokenMerger.of`` is the model's merger, bit for bit (LayerNorm / RMSNorm / Qwen3's layout), and shares
    its parameters; ``float32_copy`` (the vLLM plugin's) reproduces the merger in float32 with copied parameters."""
    model = model_factory(family)
    merger = model.model.visual.merger
    vit_dim = get_adapter(model).vit_dim()
    unit = model.model.visual.spatial_merge_size**2
    x = torch.randn(10, unit * vit_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = merger(x.reshape(-1, vit_dim))
        live = qwen_grid.PerTokenMerger.of(merger, vit_dim)
        assert torch.equal(live(x), reference)
        assert {p.data_ptr() for p in live.parameters()} <= {p.data_ptr() for p in merger.parameters()}
        half = copy.deepcopy(merger).to(torch.bfloat16)
        copied = qwen_grid.PerTokenMerger.float32_copy(half, vit_dim)
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in copied.parameters())
        torch.testing.assert_close(copied(x), copy.deepcopy(half).float()(x.reshape(-1, vit_dim)), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unknown patch merger layout"):
        qwen_grid.PerTokenMerger.of(torch.nn.Linear(2, 2), vit_dim)
