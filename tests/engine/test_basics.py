"""What a new user meets first: project files (licence, citation, type hints), config docstrings that list every
option, one exception type for an unknown option however it is given, re-registering a method from a notebook,
third-party methods in ``vtprune sweep`` (``--import``, entry points), compact ``PruneStats``, ``sequence_lengths``
from what the forward recorded, ``ViTStats.flops_ratio``, the clock kept out of compiled graphs and the bundled
tiny ViT loaded from the package."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import registry
from vtprune.methods.base import Method

REPO = Path(__file__).resolve().parents[2]
WORDS = {
    12: "twelve",
    13: "thirteen",
    14: "fourteen",
    15: "fifteen",
    16: "sixteen",
    17: "seventeen",
    18: "eighteen",
    19: "nineteen",
    20: "twenty",
    21: "twenty-one",
    22: "twenty-two",
    23: "twenty-three",
    24: "twenty-four",
}


def _all_configs():
    return [registry.get_method(m).config_cls for m in vtprune.list_methods()]


# -- project basics -----------------------------------------------------------------------------------------------
def test_project_files():
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
    assert "cff-version:" in (REPO / "CITATION.cff").read_text()
    assert "## Unreleased" in (REPO / "CHANGELOG.md").read_text()
    assert (REPO / "vtprune" / "py.typed").is_file()
    assert '"py.typed"' in (REPO / "pyproject.toml").read_text()  # package data: it ships in the wheel


def test_pyproject_description_names_every_family():
    from vtprune.adapters import supported_model_types

    text = (REPO / "pyproject.toml").read_text()
    description = re.search(r'^description = "(.*)"$', text, re.M).group(1)
    families = description[description.index("(") + 1 : description.rindex(")")].split(", ")
    assert len(families) == len(supported_model_types()) == 12
    key = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731  "Qwen2.5-VL" ~ "qwen2_5_vl"
    assert sorted(map(key, families)) == sorted(map(key, supported_model_types()))


def test_readme_method_count_matches_the_registry():
    intro = (REPO / "README.md").read_text().split("## ")[0]
    count = re.search(r"tells you what it saved: ([\w-]+) methods", intro).group(1)
    assert count == WORDS[len(vtprune.list_methods(host="vlm"))]


def test_citing_table_has_a_row_per_method():
    text = (REPO / "docs" / "citing.md").read_text()
    for name in vtprune.list_methods():
        assert f"`{name}`" in text, name


@pytest.mark.parametrize("config_cls", _all_configs(), ids=lambda c: c.__name__)
def test_config_docstrings_name_every_option(config_cls):
    doc = config_cls.__doc__ or ""
    assert not doc.startswith(f"{config_cls.__name__}("), "only dataclass's generated signature"
    missing = [f.name for f in dataclasses.fields(config_cls) if not re.search(rf"\b{f.name}\b", doc)]
    assert not missing, f"{config_cls.__name__}'s docstring does not name {missing}"


def test_help_explains_fastv_debias_options():
    doc = vtprune.FastVConfig.__doc__
    assert re.search(r"``debias_beta``: .*decay", doc) and re.search(
        r"``pad_threshold`` \(0.5\): [^*]*padding", doc, re.S
    )


# -- one exception type for an unknown option ---------------------------------------------------------------------
def test_unknown_option_is_a_type_error_however_given(tmp_path, model_factory):
    match = r"unknown option\(s\) \['layr'\] for method 'fastv'"
    with pytest.raises(TypeError, match=match):
        vtprune.patch(model_factory("llava"), "fastv", keep=4, layr=2)
    with pytest.raises(TypeError, match=match):
        vtprune.PruneConfig.from_dict({"method": "fastv", "keep": 4, "layr": 2})
    path = tmp_path / "bad.yaml"
    path.write_text("method: fastv\nkeep: 4\nlayr: 2\n")
    with pytest.raises(TypeError, match=match):
        vtprune.PruneConfig.from_yaml(path)
    with pytest.raises(TypeError):  # the config class itself: Python's own TypeError
        vtprune.FastVConfig(keep=4, layr=2)


def test_config_class_from_yaml_refuses_another_methods_file(tmp_path):
    with pytest.raises(ValueError, match=r"FastVConfig.*'dart'.*DARTConfig"):
        vtprune.FastVConfig.from_yaml(REPO / "configs" / "methods" / "dart.yaml")
    assert type(vtprune.FastVConfig.from_yaml(REPO / "configs" / "methods" / "fastv.yaml")) is vtprune.FastVConfig
    assert type(vtprune.PruneConfig.from_yaml(REPO / "configs" / "methods" / "dart.yaml")) is vtprune.DARTConfig
    with pytest.raises(ValueError, match="FastVConfig.*DARTConfig"):
        vtprune.FastVConfig.from_dict(vtprune.DARTConfig(keep=4).to_dict())
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("- {method: divprune, keep: 8}\n- {method: fastv}\n")
    with pytest.raises(ValueError, match="holds a schedule"):
        vtprune.FastVConfig.from_yaml(schedule)


# -- registering methods ------------------------------------------------------------------------------------------
def _method_class(name: str, module: str):
    @dataclasses.dataclass
    class _Cfg(vtprune.PruneConfig):
        """Keeps the first tokens (a test method)."""

    class KeepFirst(Method):
        stage = "vision"

        def select(self, image):
            return torch.arange(image.k)

    KeepFirst.__module__ = _Cfg.__module__ = module
    KeepFirst.__qualname__ = "KeepFirst"
    return KeepFirst, _Cfg


@pytest.fixture
def clean_registry():
    before = dict(registry._METHODS)
    yield
    registry._METHODS.clear()
    registry._METHODS.update(before)


def test_rerunning_a_notebook_cell_re_registers(clean_registry):
    first, cfg = _method_class("k", "__main__")
    vtprune.register_method("_nb_first", cfg)(first)
    again, cfg2 = _method_class("k", "__main__")  # the cell run again: a new class object, same name
    vtprune.register_method("_nb_first", cfg2)(again)
    assert registry.get_method("_nb_first").method_cls is again


def test_registering_a_taken_name_needs_override(clean_registry):
    mine, cfg = _method_class("k", "my_package.methods")
    with pytest.raises(ValueError, match="'random' is already registered.*override=True"):
        vtprune.register_method("random", cfg)(mine)
    other, cfg2 = _method_class("k", "__main__")
    with pytest.raises(ValueError, match="already registered"):  # __main__, but not a re-run of the same class
        vtprune.register_method("random", cfg2)(other)
    vtprune.register_method("random", cfg, override=True)(mine)
    assert registry.get_method("random").method_cls is mine


_PLUGIN = textwrap.dedent('''
    import dataclasses
    import torch
    import vtprune
    from vtprune.methods.base import Method

    @dataclasses.dataclass
    class KeepFirstConfig(vtprune.PruneConfig):
        """Keeps the first tokens (a test plugin)."""

    @vtprune.register_method("{name}", KeepFirstConfig)
    class KeepFirst(Method):
        stage = "vision"

        def select(self, image):
            return torch.arange(image.k)
''')


def test_sweep_import_option_loads_a_user_method(tmp_path, monkeypatch, clean_registry):
    pytest.importorskip("lmms_eval")
    from vtprune import cli, harness
    from vtprune.harness.tiny import random_model_config

    model = tmp_path / "model"
    random_model_config().save_pretrained(model)
    (tmp_path / "plugin_keepfirst.py").write_text(_PLUGIN.format(name="_cli_keepfirst"))
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"name: t\nmodels: [{model}]\nmethods: [_cli_keepfirst]\nbudgets: [4]\n"
        "tasks: [{task: vtprune_shapes, metric: exact_match}]\n"
    )
    seen = []
    monkeypatch.setattr(harness, "run_sweep", lambda cfg, **kw: seen.append([m.method for m in cfg.methods]) or [])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "plugin_keepfirst", raising=False)
    assert cli.main(["sweep", str(config)]) == 2  # unknown method: refused before anything runs
    assert not seen
    assert cli.main(["sweep", "--import", "plugin_keepfirst", str(config)]) == 0
    assert seen == [["_cli_keepfirst"]]
    assert cli.main(["sweep", "--import", "no_such_module_xyz", str(config)]) == 2


def test_entry_point_methods_load_on_lookup(tmp_path, monkeypatch, clean_registry):
    from importlib import metadata

    (tmp_path / "ep_keepfirst.py").write_text(_PLUGIN.format(name="_ep_keepfirst"))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [metadata.EntryPoint("keepfirst", "ep_keepfirst", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [e for e in eps if e.group == group])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert registry.get_method("_ep_keepfirst").name == "_ep_keepfirst"
    assert "_ep_keepfirst" in vtprune.list_methods()


def test_a_broken_entry_point_warns_and_vtprune_still_works(monkeypatch, clean_registry):
    from importlib import metadata

    eps = [metadata.EntryPoint("broken", "no_such_module_xyz", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: eps)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="'broken'.*failed to load"):
        assert "fastv" in vtprune.list_methods()


# -- stats ------------------------------------------------------------------------------------------------------
def test_prune_stats_repr_is_compact_and_sequence_lengths_use_what_was_recorded(model_factory):
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4), (3, 1, 2)])
    with vtprune.patched(model, [vtprune.DivPruneConfig(keep=8), vtprune.FastVConfig(keep=4, layer=2)]):
        with torch.no_grad():
            model(**x)
        st = vtprune.stats(model)
    text = repr(st)
    assert "\n" not in text and "tensor(" not in text and len(text) < 1000
    assert "kept_indices=<2 tensors of [4, 4] indices>" in text and "visual_tokens_kept=[4, 4]" in text
    real = x["attention_mask"].sum(1).tolist()  # independent: the prompts' real tokens as the caller made them
    layers = model.config.text_config.num_hidden_layers
    assert st.prompt_lengths == real and st.num_layers == layers
    for row in range(2):
        assert st.sequence_lengths(row) == st.sequence_lengths(row, real[row], layers)
    s = real[0]
    assert st.sequence_lengths() == [s - 8, s - 8, s - 12, s - 12]


def test_vit_stats_flops_ratio_and_batch():
    pytest.importorskip("timm")
    from vtprune import tiny_vit
    from vtprune.flops import vit_flops

    model, config = tiny_vit.load()  # package code: no import from eval/
    x, _ = tiny_vit.test_set(3, size=config["timm_kwargs"]["img_size"])
    with vtprune.patched(model, "tome", ratio=0.5), torch.no_grad():
        model(x)
        st = vtprune.stats(model)
    assert st.batch == 3
    per_image = vit_flops(model, st.block_flops_tokens)
    assert st.flops == 3 * per_image == vit_flops(model, st.block_flops_tokens, batch=3)
    assert st.flops_full == 3 * vit_flops(model)
    assert st.flops_ratio == pytest.approx(per_image / vit_flops(model)) and 0 < st.flops_ratio < 1


def test_clock_is_not_read_inside_a_compiled_graph():
    from vtprune.timing import clock, elapsed_ms

    def f(x):
        return x * 2, clock()

    _, t = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))  # fullgraph: no break at the clock
    assert t == 0.0 and clock() > 0 and elapsed_ms(0.0) == 0.0
