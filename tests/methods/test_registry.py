"""One registry for every method (VLM and ViT hosts): records, filters, facts read from the method's own file."""

import dataclasses
from typing import ClassVar

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import cli
from vtprune.methods.base import Method
from vtprune.registry import FILTERS, get_method, list_methods, register_method, spec_for_config


def test_every_method_is_listed_once_with_its_host():
    every = list_methods()
    assert every == sorted(set(every))
    vlm, vit = list_methods(host="vlm"), list_methods(host="vit")
    assert sorted(vlm + vit) == every and not set(vlm) & set(vit)
    assert vit == vtprune.list_vit_methods() == ["pitome", "tome", "zerotprune"]
    assert {"fastv", "dart", "divprune", "random"} <= set(vlm)
    for name in every:
        spec = get_method(name)
        assert spec.name == name and spec.config_cls.method == name and spec.method_cls.name == name
        assert getattr(vtprune, spec.config_cls.__name__) is spec.config_cls  # exported from vtprune


def test_filters_read_the_record():
    assert list_methods(stage="llm") == sorted(n for n in list_methods() if get_method(n).stage == "llm")
    assert set(list_methods(stage="tower")) == set(list_methods(host="vit"))
    assert list_methods(stage=("vision", "llm")) == list_methods(host="vlm")
    assert "pool" in list_methods(merges=True) and "random" not in list_methods(merges=True)
    assert list_methods(host="vlm", kept_from_grid=True) == ["pool", "random"]
    # every method prunes images and videos unless its record says otherwise (the video methods: videos only);
    # modality matches any of the values
    videos_only = {"evs", "fastvid", "flashvid", "vidcom2"}
    assert list_methods(modality=("image", "video")) == list_methods() == list_methods(modality="video")
    assert set(list_methods()) - set(list_methods(modality="image")) == videos_only
    assert all(get_method(n).modalities == {"image", "video"} for n in list_methods(modality="image"))
    assert all(get_method(n).modalities == {"video"} for n in videos_only)
    with pytest.raises(TypeError, match=r"unknown filter\(s\) \['hots'\].*allowed"):
        list_methods(hots="vlm")
    assert set(FILTERS) >= {"host", "stage"}


def test_facts_live_on_the_method_class():
    assert get_method("pdrop").run_options == {"budget_kind": "last"}
    assert get_method("cdpruner").run_options == {"text": "llm"}
    assert get_method("todre").vllm_options == {"late_drop": False}
    assert get_method("random").unreachable and get_method("fastv").unreachable is None
    assert get_method("fastv").surrogate.exact and get_method("divprune").surrogate.name == "feature-isolation"
    # a record's dicts are copies: consumers cannot change a method's facts
    get_method("pdrop").run_options["budget_kind"] = "average"
    assert get_method("pdrop").run_options == {"budget_kind": "last"}


def test_a_method_registers_once_across_hosts():
    @dataclasses.dataclass
    class Cfg(vtprune.PruneConfig):
        pass

    for host in ("vlm", "vit"):
        with pytest.raises(ValueError, match="'tome' is already registered"):
            register_method("tome", Cfg, host=host)(type("T", (Method,), {}))
    with pytest.raises(ValueError, match=r"host must be one of \('vlm', 'vit'\), got 'gpu'"):
        register_method("x_registry_test", Cfg, host="gpu")


def test_vit_method_names_in_vlm_only_places_are_refused_clearly():
    from vtprune.methods.vit import get_vit_method

    with pytest.raises(ValueError, match="'fastv' prunes a VLM's visual tokens.*pitome, tome, zerotprune"):
        get_vit_method("fastv")
    with pytest.raises(ValueError, match="unknown method 'tomee'.*Did you mean 'tome'"):
        get_method("tomee")


def test_options_are_the_method_own_fields_with_defaults():
    assert get_method("fastv").options()["layer"] == 2
    assert "keep" not in get_method("fastv").options() and "positions" not in get_method("tome").options()
    assert get_method("tome").options() == {"r": None, "prop_attn": True}


def test_methods_command_lists_the_registry(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines()[2:]]
    assert rows == list_methods()
    assert "layer=2" in next(line for line in out.splitlines() if line.startswith("| fastv "))
    assert cli.main(["methods", "--host", "vit"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == list_methods(host="vit")


def test_a_sweep_methods_all_expands_to_the_registry_and_explicit_entries_win():
    hconfig = pytest.importorskip("vtprune.harness.config", exc_type=ImportError)

    base = {"models": [{"pretrained": "x"}], "budgets": [16], "tasks": ["t"]}
    cfg = hconfig.load_config(
        {
            **base,
            "methods": [
                "all",
                {"method": "pdrop", "options": {"budget_kind": "average"}},
                {"method": "fastv", "options": {"debias": True}, "name": "fv+d"},
            ],
        }
    )
    names = [m.name for m in cfg.methods]
    # ``all`` is the methods that prune images unless it names a modality
    assert sorted(set(names) - {"fv+d"}) == list_methods(host="vlm", modality="image") and len(names) == len(set(names))
    by = {m.name: m for m in cfg.methods}
    assert by["pdrop"].options == {"budget_kind": "average"}  # the explicit entry, not the expansion
    assert by["cdpruner"].options == get_method("cdpruner").run_options  # expanded with its run options
    cfg = hconfig.load_config({**base, "methods": [{"all": {"stage": "llm", "exclude": ["pact"]}}]})
    assert [m.method for m in cfg.methods] == [n for n in list_methods(stage="llm") if n != "pact"]
    cfg = hconfig.load_config({**base, "methods": [{"all": {"modality": "video"}}]})
    assert [m.method for m in cfg.methods] == list_methods(host="vlm", modality="video")
    assert {"evs", "vidcom2"} <= {m.method for m in cfg.methods}
    for bad, message in (
        (["all", {"all": {"stage": "gpu"}}], "matches no registered method"),
        (["all", "all"], "duplicate name"),
        ([{"all": {"exclude": ["fastvv"]}}], "unknown method 'fastvv'"),
        ([{"all": {"hots": "vlm"}}], r"unknown key\(s\) \['hots'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            hconfig.load_config({**base, "methods": bad})


def test_config_dicts_carry_a_version_and_old_ones_migrate(monkeypatch):
    cfg = vtprune.FastVConfig(keep=5, layer=3)
    data = cfg.to_dict()
    assert data["config_version"] == vtprune.PruneConfig.VERSION == 1 and data["method"] == "fastv"
    assert vtprune.PruneConfig.from_dict(data) == cfg
    legacy = {k: v for k, v in data.items() if k != "config_version"}  # written before versions existed
    assert vtprune.PruneConfig.from_dict(legacy) == cfg
    with pytest.raises(ValueError, match=r"version 2; this vtprune reads versions 0 to 1"):
        vtprune.PruneConfig.from_dict({**data, "config_version": 2})
    with pytest.raises(ValueError, match="version 'one'"):
        vtprune.PruneConfig.from_dict({**data, "config_version": "one"})
    # a method whose options changed migrates from the older versions
    seen = []

    def migrate(cls, options, version):
        seen.append(version)
        options = dict(options)
        options["layer"] = options.pop("old_layer")
        return options

    monkeypatch.setattr(vtprune.FastVConfig, "VERSION", 2)
    monkeypatch.setattr(vtprune.FastVConfig, "migrate", classmethod(migrate))
    old = vtprune.PruneConfig.from_dict({"method": "fastv", "config_version": 1, "keep": 5, "old_layer": 3})
    assert old == cfg and seen == [1]
    # a method option named "version" is an option, not the dict's version (sparsevlm's)
    sparse = vtprune.SparseVLMConfig(keep=64, version="v2")
    assert vtprune.PruneConfig.from_dict(sparse.to_dict()) == sparse


def test_a_config_finds_its_method_by_its_type(model_factory):
    for name in list_methods():
        spec = get_method(name)
        config = spec.config_cls(keep=4, **spec.run_options)
        assert spec_for_config(config) is spec and get_method(config) is spec

    # the type decides, not the name string on the class: a subclass that claims another method's name runs its own
    @dataclasses.dataclass
    class Claims(vtprune.DivPruneConfig):
        method: ClassVar[str] = "fastv"

    assert spec_for_config(Claims(keep=4)).name == "divprune"
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 2)])
    kept = []
    for config in (Claims(keep=4), vtprune.DivPruneConfig(keep=4)):
        with vtprune.patched(model, config), torch.no_grad():
            model(**inputs)
            stats = vtprune.stats(model)
            kept.append(([s.method for s in stats.stages], stats.visual_tokens_kept))
    assert kept[0] == kept[1] == (["divprune"], [4])


def test_an_unregistered_config_type_is_refused_naming_the_registered_ones(model_factory):
    @dataclasses.dataclass
    class Unregistered(vtprune.PruneConfig):
        pass

    model = model_factory("llava")
    for config in (Unregistered(keep=2), vtprune.PruneConfig(keep=2)):
        name = type(config).__qualname__
        with pytest.raises(
            TypeError, match=rf"no method is registered for config type .*{name}.*DivPruneConfig \(divp"
        ):
            vtprune.patch(model, config)
        with pytest.raises(TypeError, match="no method is registered for config type"):
            vtprune.patch(model, [vtprune.FastVConfig(keep=2), config])
    assert not vtprune.is_patched(model)
    with pytest.raises(TypeError, match=r"expected a method config instance .* got str"):
        spec_for_config("divprune")


def test_a_config_class_belongs_to_one_method():
    with pytest.raises(ValueError, match=r"config class DivPruneConfig already belongs to method 'divprune'"):
        register_method("x_registry_shared", vtprune.DivPruneConfig)(type("Shared", (Method,), {}))
    assert "x_registry_shared" not in list_methods()
