"""configs/methods/*.yaml: one preset per registered method, loadable, and equal to the code's paper defaults."""

import dataclasses
from pathlib import Path

import pytest

import vtprune
from vtprune import registry

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "methods"


@pytest.mark.parametrize("method", vtprune.list_methods(host="vlm"))
def test_every_method_has_a_preset_with_the_code_defaults(method):
    path = PRESETS / f"{method}.yaml"
    assert path.is_file(), f"no preset {path.name} for registered method {method!r}"
    cfg = vtprune.PruneConfig.from_yaml(path)
    spec = registry.get_method(method)
    assert type(cfg) is spec.config_cls
    for field in dataclasses.fields(cfg):
        if field.name in ("keep", "ratio"):
            continue
        assert getattr(cfg, field.name) == field.default, (method, field.name)


def test_bad_preset_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="schedule element 0 is a str"):
        vtprune.PruneConfig.from_yaml(bad)
    bad.write_text("3\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        vtprune.PruneConfig.from_yaml(bad)
    bad.write_text("method: dart\nkeep: 64\nlayr: 3\n")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['layr'\]"):  # as patch(..., layr=3) does
        vtprune.PruneConfig.from_yaml(bad)


@pytest.mark.parametrize(
    "text,match", [("[]\n", "empty list"), ("- divprune\n- {method: fastv, keep: 4}\n", "schedule element 0 is a str")]
)
def test_bad_yaml_schedules_name_the_problem(tmp_path, text, match):
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        vtprune.PruneConfig.from_yaml(path)
