"""vtprune.harness without running a sweep: config checks (before any model loads), the lmms-eval plugin's
arguments and registration, table maths on hand-made rows, the real-benchmark configs against lmms-eval's
task index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from vtprune import cli  # noqa: E402
from vtprune.harness import config as hconfig  # noqa: E402
from vtprune.harness import sweep as hsweep  # noqa: E402
from vtprune.harness.model import VTPrune, method_config  # noqa: E402
from vtprune.harness.tables import build_tables, to_csv, to_latex, to_markdown  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "eval" / "tasks"


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything tries to load model weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was reported")

    monkeypatch.setattr(hsweep, "load_pretrained", refuse)
    monkeypatch.setattr(hsweep, "save_random_model", refuse)


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    """Only a config.json of a small LLaVA (no weights): enough for every check before loading."""
    from vtprune.harness.tiny import random_model_config

    path = tmp_path_factory.mktemp("llava_config")
    random_model_config().save_pretrained(path)
    return path


def _config(model_dir, **over):
    cfg = {
        "models": [{"pretrained": str(model_dir), "name": "tiny"}],
        "methods": ["random"],
        "budgets": [16],
        "tasks": ["vtprune_shapes"],
        "include_path": str(TASKS),
        "device": "cpu",
    }
    cfg.update(over)
    return cfg


# -- config errors, all raised before anything loads ------------------------------------------------------------------
def test_unknown_method_before_loading(tiny_llava_dir, no_loading, tmp_path):
    with pytest.raises(ValueError, match=r"methods\[1\].*unknown method 'dartt'.*Did you mean 'dart'"):
        hsweep.run_sweep(_config(tiny_llava_dir, methods=["random", "dartt"]), output_dir=tmp_path)


def test_unknown_method_option_before_loading(tiny_llava_dir, no_loading, tmp_path):
    bad = {"method": "dart", "options": {"layers": 2}}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layers'\] for method 'dart'.*allowed"):
        hsweep.run_sweep(_config(tiny_llava_dir, methods=[bad]), output_dir=tmp_path)
    with pytest.raises(ValueError, match="budgets"):
        hsweep.run_sweep(
            _config(tiny_llava_dir, methods=[{"method": "dart", "options": {"keep": 3}}]), output_dir=tmp_path
        )


def test_bad_budgets_and_keys(tiny_llava_dir):
    with pytest.raises(ValueError, match=r"budgets\[1\]: expected an int >= 1, got 0"):
        hconfig.load_config(_config(tiny_llava_dir, budgets=[16, 0]))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['budget'\]"):
        hconfig.load_config({**_config(tiny_llava_dir), "budget": [1]})
    with pytest.raises(ValueError, match="always run"):
        hconfig.load_config(_config(tiny_llava_dir, methods=["none"]))
    with pytest.raises(ValueError, match="duplicate name"):
        hconfig.load_config(_config(tiny_llava_dir, methods=["fastv", "fastv"]))


def test_unknown_task_before_loading(tiny_llava_dir, no_loading, tmp_path):
    with pytest.raises(ValueError, match="unknown lmms-eval task 'vtprune_shape'.*Did you mean 'vtprune_shapes'"):
        hsweep.run_sweep(_config(tiny_llava_dir, tasks=["vtprune_shape"]), output_dir=tmp_path)


def test_unknown_metric_before_loading(tiny_llava_dir, no_loading, tmp_path):
    with pytest.raises(ValueError, match="no metric 'accuracy'.*exact_match"):
        hsweep.run_sweep(
            _config(tiny_llava_dir, tasks=[{"task": "vtprune_shapes", "metric": "accuracy"}]), output_dir=tmp_path
        )


def test_unknown_model_before_loading(no_loading, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is not a folder with a config.json"):
        hsweep.run_sweep(_config(tmp_path / "missing"), output_dir=tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network in tests
    with pytest.raises(ValueError, match="cannot read the config of 'nobody-xyz/no-such-vlm'"):
        hsweep.run_sweep(_config("nobody-xyz/no-such-vlm"), output_dir=tmp_path)
    (tmp_path / "bert").mkdir()
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="model_type 'bert'; vtprune supports"):
        hsweep.run_sweep(_config(tmp_path / "bert"), output_dir=tmp_path)


def test_a_schedule_is_a_method_of_the_sweep(tiny_llava_dir):
    schedule = [{"method": "divprune", "ratio": 0.5}, {"method": "fastv", "layer": 2}]
    cfg = hconfig.load_config(
        _config(tiny_llava_dir, budgets=[4, 8], methods=["random", {"name": "divprune+fastv", "schedule": schedule}])
    )
    spec = cfg.methods[1]
    assert (spec.name, spec.method, spec.options) == ("divprune+fastv", "schedule", {"schedule": schedule})
    configs = method_config(spec.method, keep=8, **spec.options)
    assert [c.method for c in configs] == ["divprune", "fastv"]
    assert (configs[0].ratio, configs[0].keep) == (0.5, None) and (configs[1].keep, configs[1].layer) == (8, 2)


@pytest.mark.parametrize(
    "schedule,match",
    [
        (
            [{"method": "divprune", "ratio": 0.5}, {"method": "fastv", "keep": 3}],
            r"last step\) takes the cell's budget",
        ),
        ([{"method": "divprune"}, {"method": "fastv"}], r"schedule\[0\] \('divprune'\) needs its own budget"),
        ([{"method": "fastv"}], "two or more"),
        ([{"method": "divprune", "ratio": 0.5}, {"method": "fastvv"}], "unknown method 'fastvv'"),
        ([{"method": "divprune", "ratio": 0.5}, "fastv"], r"schedule\[1\] must be a mapping"),
    ],
)
def test_bad_schedules_before_loading(tiny_llava_dir, schedule, match):
    with pytest.raises(ValueError, match=match):
        hconfig.load_config(_config(tiny_llava_dir, methods=[{"name": "s", "schedule": schedule}]))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['name'\]|name"):
        hconfig.load_config(_config(tiny_llava_dir, methods=[{"schedule": schedule}]))


def test_a_schedule_two_methods_at_one_point_fails_before_loading(tiny_llava_dir, no_loading, tmp_path):
    schedule = [{"method": "divprune", "ratio": 0.5}, {"method": "random"}]
    with pytest.raises(ValueError, match="cannot run on model.*two methods act at one prune point"):
        hsweep.run_sweep(_config(tiny_llava_dir, methods=[{"name": "s", "schedule": schedule}]), output_dir=tmp_path)


def test_method_the_model_cannot_run_before_loading(no_loading, tmp_path):
    """CLS attention on Qwen2-VL (no CLS token; importance="cls") is refused from the config alone (a meta-device
    model)."""
    import tiny

    model = tiny.build("qwen2_vl")
    model.config.save_pretrained(tmp_path / "qwen")
    methods = ["fastv", {"method": "cls", "options": {"importance": "cls"}, "name": "cls"}]
    with pytest.raises(ValueError, match="method 'cls' cannot run on model 'qwen'.*no CLS token"):
        hsweep.run_sweep(
            _config(
                tmp_path / "qwen", methods=methods, models=[{"pretrained": str(tmp_path / "qwen"), "name": "qwen"}]
            ),
            output_dir=tmp_path,
        )


def test_a_later_budget_the_method_cannot_reach_fails_before_loading(tiny_llava_dir, no_loading, tmp_path):
    """Every budget is checked, not only the first: ToMe in this 2-block tower (read at layer -2: one merging block)
    reaches 128 of 256 patches but not 64."""
    with pytest.raises(
        ValueError, match=r"method 'tome' cannot run on model 'tiny' at budget 64: .*keep must be >= 128"
    ):
        hsweep.run_sweep(_config(tiny_llava_dir, methods=["tome"], budgets=[128, 64]), output_dir=tmp_path)


def test_a_pdrop_budget_below_the_floor_fails_before_loading(tiny_llava_dir, no_loading, tmp_path):
    """pdrop's budget is the average over decoder layers: 8 tokens cannot be met on this 256-token, 4-layer LLaVA
    (the first layer alone averages 64); refused by the pre-check, not after the unpruned cell."""
    with pytest.raises(ValueError, match=r"method 'pdrop' cannot run on model 'tiny' at budget 8: .*a budget above 64"):
        hsweep.run_sweep(_config(tiny_llava_dir, methods=["pdrop"], budgets=[128, 8]), output_dir=tmp_path)


def test_cli_reports_config_errors(tmp_path, capsys, no_loading):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [x]\nmethods: [nope]\nbudgets: [4]\ntasks: [vtprune_shapes]\n")
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "vtprune sweep: error:" in err and "unknown method 'nope'" in err
    assert cli.main(["sweep", str(tmp_path / "nothing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_relative_paths_follow_the_config_file(tmp_path):
    (tmp_path / "m").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(
        "include_path: tasks_here\nmodels: [{pretrained: m}]\nmethods: [random]\nbudgets: [2]\ntasks: [t]\n"
    )
    with pytest.raises(ValueError, match="tasks_here.*is not a folder"):
        hconfig.load_config(path)
    (tmp_path / "tasks_here").mkdir()
    cfg = hconfig.load_config(path)
    assert cfg.models[0].pretrained == str((tmp_path / "m").resolve())
    assert cfg.include_path == [(tmp_path / "tasks_here").resolve()]
    assert cfg.output_dir == Path("runs") / "c"
    hub = hconfig.load_config(
        {"models": ["llava-hf/llava-1.5-7b-hf"], "methods": ["fastv"], "budgets": [64], "tasks": ["gqa"]},
        base_dir=tmp_path,
    )
    assert hub.models[0].pretrained == "llava-hf/llava-1.5-7b-hf" and hub.models[0].name == "llava-1.5-7b-hf"


# -- the lmms-eval plugin ----------------------------------------------------------------------------------------------
def test_plugin_is_registered_with_lmms_eval():
    from lmms_eval.models import get_model

    assert get_model("vtprune") is VTPrune


def test_plugin_model_args_are_checked_before_loading(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\] for method 'dart'"):
        VTPrune.create_from_arg_string(f"pretrained={missing},method=dart,keep=16,layer=2,bogus=1")
    with pytest.raises(ValueError, match="unknown method 'fastvv'"):
        VTPrune.create_from_arg_string(f"pretrained={missing},method=fastvv,keep=16")
    with pytest.raises(ValueError, match="needs a budget"):
        VTPrune.create_from_arg_string(f"pretrained={missing},method=fastv")
    with pytest.raises(ValueError, match="takes no budget"):
        VTPrune.create_from_arg_string(f"pretrained={missing},keep=16")


# -- tables ------------------------------------------------------------------------------------------------------------
def _row(
    method,
    budget,
    task,
    value,
    *,
    scale=100.0,
    maximum=100.0,
    tokens=8,
    tflops=1.0,
    ms=10.0,
    n=10,
    limit=None,
    model="m",
):
    return {
        "model": model,
        "limit": limit,
        "method": method,
        "budget": budget,
        "task": task,
        "value": value,
        "score": value * scale,
        "max": maximum,
        "visual_tokens": tokens,
        "prefill_tflops": tflops,
        "prefill_ms": ms,
        "n": n,
    }


def _maths_rows():
    return [
        _row("none", None, "acc", 0.80, tokens=576, tflops=4.0, ms=100.0),
        _row("none", None, "mme", 1500.0, scale=1, maximum=2000, tokens=576, tflops=4.0, ms=100.0),
        _row("fastv", 64, "acc", 0.60, tflops=1.0, ms=30.0, n=10),
        _row("fastv", 64, "mme", 1200.0, scale=1, maximum=2000, tflops=2.0, ms=50.0, n=30),
        _row("dart", 64, "acc", 0.70),
        _row("dart", 64, "mme", 0.0, scale=1, maximum=2000),  # superseded by the next row (last one wins)
        _row("dart", 64, "mme", 1350.0, scale=1, maximum=2000),
        _row("fastv", 128, "acc", 0.75),  # mme missing: no Avg / Rel.
    ]


def test_table_maths():
    (table,) = build_tables(_maths_rows())
    assert table.tasks == ["acc", "mme"]
    assert [(r.label, r.budget) for r in table.rows] == [
        ("Unpruned", None),
        ("fastv", 128),
        ("fastv", 64),
        ("dart", 64),
    ]
    base, fastv128, fastv64, dart64 = table.rows
    assert base.avg == pytest.approx((80 + 1500 / 2000 * 100) / 2)
    assert base.rel == pytest.approx(100.0)
    assert fastv64.scores == {"acc": pytest.approx(60.0), "mme": 1200.0}
    assert fastv64.avg == pytest.approx((60 + 60) / 2)
    assert fastv64.rel == pytest.approx((0.60 / 0.80 + 1200 / 1500) / 2 * 100)
    assert dart64.rel == pytest.approx((0.70 / 0.80 + 1350 / 1500) / 2 * 100)
    assert fastv128.avg is None and fastv128.rel is None
    # cost columns: request-weighted means over the row's tasks
    assert fastv64.tflops == pytest.approx((1.0 * 10 + 2.0 * 30) / 40)
    assert fastv64.prefill_ms == pytest.approx((30.0 * 10 + 50.0 * 30) / 40)
    assert base.tokens == 576


def test_table_formats_agree():
    tables = build_tables(_maths_rows())
    md = to_markdown(tables).splitlines()
    assert md[0] == "### m" and md[2].split("|")[1].strip() == "Method"
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[4:]]
    assert body[2][:6] == ["fastv", "64", "60.0", "1200.0", "60.0", f"{(0.75 + 0.8) / 2 * 100:.1f}"]
    assert body[1][4:6] == ["-", "-"]
    csv_rows = [line.split(",") for line in to_csv(tables).strip().splitlines()]
    assert csv_rows[0][:6] == ["model", "limit", "method", "budget", "acc", "mme"]
    assert csv_rows[3][2:4] == ["fastv", "64"] and float(csv_rows[3][7]) == pytest.approx((0.75 + 0.8) / 2 * 100)
    tex = to_latex(tables)
    assert r"\toprule" in tex and r"Rel. \%" in tex and "fastv & 64 & 60.0 & 1200.0 & 60.0" in tex


def test_tables_show_a_nominal_budget_beside_the_tokens_kept():
    rows = [
        _row("none", None, "acc", 0.8, tokens=16),
        _row("fastv", 6, "acc", 0.6, tokens=6),
        _row("sparsevlm", 28, "acc", 0.7, tokens=8),
        _row("dart", 6, "acc", 0.5, tokens=6),
    ]
    rows[0]["visual_tokens_nominal"], rows[1]["visual_tokens_nominal"] = 16, 6
    rows[2]["visual_tokens_nominal"] = 28  # dart's row predates the field: tokens only
    tables = build_tables(rows)
    md = [[c.strip() for c in line.strip("|").split("|")] for line in to_markdown(tables).splitlines()[4:]]
    tokens = md[0].index("16")
    assert [r[tokens] for r in md] == ["16", "8 (nominal 28)", "6", "6"]
    csv_rows = [line.split(",") for line in to_csv(tables).strip().splitlines()]
    col = csv_rows[0].index("tokens_nominal")
    assert csv_rows[0][col - 1] == "tokens" and [r[col] for r in csv_rows[1:]] == ["16.0", "28.0", "6.0", ""]
    assert "sparsevlm & 28 & 70.0" in to_latex(tables) and "8 (nominal 28)" in to_latex(tables)


def test_rel_is_undefined_against_a_zero_baseline():
    rows = [_row("none", None, "acc", 0.0), _row("fastv", 4, "acc", 0.5)]
    (table,) = build_tables(rows)
    assert table.rows[1].avg == pytest.approx(50.0) and table.rows[1].rel is None
    assert math.isclose(table.rows[0].avg, 0.0)


def test_tables_split_by_model_and_limit():
    rows = [
        _row("none", None, "acc", 0.5),
        _row("none", None, "acc", 0.4, limit=8),
        _row("none", None, "acc", 0.3, model="other"),
    ]
    assert [t.title for t in build_tables(rows)] == ["m", "m (limit 8)", "other"]


def test_read_results_errors(tmp_path):
    with pytest.raises(ValueError, match="no results file"):
        hsweep.read_results(tmp_path)
    (tmp_path / "results.jsonl").write_text(json.dumps({"a": 1}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON row"):
        hsweep.read_results(tmp_path)


# -- the real-benchmark configs ---------------------------------------------------------------------------------------
def test_benchmark_configs_name_real_tasks_and_metrics():
    """The shipped configs parse, and every task and metric exists in lmms-eval's own task index (offline: the
    index is read from the installed package; the datasets and models would come from the hub)."""
    tm = None
    for name in (
        "llava15_7b",
        "qwen25vl_7b",
        "qwen3vl_8b",
        "qwen35",
        "llava_onevision_7b",
        "internvl3_5_8b",
        "gemma3_4b",
    ):
        cfg = hconfig.load_config(REPO / "configs" / "sweeps" / f"{name}.yaml")
        assert cfg.budgets == [64, 128, 192]
        assert {t.task for t in cfg.tasks} == {
            "gqa",
            "mmbench_en_dev_static",
            "mme",
            "pope",
            "scienceqa_img",
            "textvqa_val",
            "vqav2_val",
        }
        tm = tm or hsweep._task_manager([], [t.task for t in cfg.tasks])
        for t in cfg.tasks:
            assert hsweep._resolve_metric(tm, t) == t.metric
    assert (
        hconfig.load_config(REPO / "configs/sweeps/llava15_7b.yaml").models[0].pretrained == "llava-hf/llava-1.5-7b-hf"
    )
    assert (
        hconfig.load_config(REPO / "configs/sweeps/qwen25vl_7b.yaml").models[0].pretrained
        == "Qwen/Qwen2.5-VL-7B-Instruct"
    )


def _pruning(methods):
    """A config's methods without the ``downsample`` row (whose pre-check reads the model's processor from the hub)."""
    return [m for m in methods if m.method != "downsample"]


def _refused_on(family: str) -> set:
    """The methods whose capabilities refuse ``family`` at ``patch`` (e.g. ``prumerge``: no CLS token, or crops)."""
    from conftest import refused_by_capabilities

    import vtprune

    return {m for m in vtprune.list_methods(host="vlm", modality="image") if refused_by_capabilities(m, family)}


def test_benchmark_config_methods_run_on_their_models():
    """Every method of a shipped config patches its model's architecture (weightless: transformers' default
    LlavaConfig / Qwen2_5_VLConfig are the 7B architectures), and llava15_7b lists every registered method."""
    from transformers import LlavaConfig, Qwen2_5_VLConfig

    import vtprune

    llava = hconfig.load_config(REPO / "configs/sweeps/llava15_7b.yaml")
    qwen = hconfig.load_config(REPO / "configs/sweeps/qwen25vl_7b.yaml")
    assert {m.method for m in llava.methods} == set(vtprune.list_methods(host="vlm", modality="image"))
    hsweep._check_methods(llava.models[0], LlavaConfig(), llava.methods, [64])
    assert "downsample" in {m.method for m in qwen.methods}  # its processor check needs the hub: test_downsample.py
    hsweep._check_methods(qwen.models[0], Qwen2_5_VLConfig(), _pruning(qwen.methods), [64])


def test_qwen3_benchmark_configs_run_on_their_architectures():
    """Qwen3-VL-8B and Qwen3.5-9B (transformers' default Qwen3_5Config is the 9B decoder: 32 layers, a full-attention
    layer every 4th) patch with every listed method; fastv at its default K=2 is refused on Qwen3.5 (layer 1 is
    linear attention), which is why the config runs it at K=4."""
    from transformers import Qwen3_5Config, Qwen3VLConfig

    import vtprune

    q3 = hconfig.load_config(REPO / "configs/sweeps/qwen3vl_8b.yaml")
    q35 = hconfig.load_config(REPO / "configs/sweeps/qwen35.yaml")
    assert q3.models[0].pretrained == "Qwen/Qwen3-VL-8B-Instruct" and q35.models[0].pretrained == "Qwen/Qwen3.5-9B"
    cfg35 = Qwen3_5Config()
    assert cfg35.text_config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    hsweep._check_methods(q3.models[0], Qwen3VLConfig(), _pruning(q3.methods), [64])
    hsweep._check_methods(q35.models[0], cfg35, _pruning(q35.methods), [64])
    fastv = [m for m in q35.methods if m.method == "fastv"][:1]
    with pytest.raises(ValueError, match="linear_attention"):
        hsweep._check_methods(q35.models[0], cfg35, [type(fastv[0])(**{**vars(fastv[0]), "options": {}})], [64])
    assert (
        {m.method for m in _pruning(q3.methods)}
        == {m.method for m in _pruning(q35.methods)}
        == {
            m
            for m in vtprune.list_methods(host="vlm", modality="image")
            if m not in ("cls", "todre", "visionzip", "vispruner", "pdrop")
        }
        - _refused_on("qwen3_vl")
    )
    assert "downsample" in {m.method for m in q3.methods} & {m.method for m in q35.methods}


def test_llava_onevision_benchmark_config_runs_on_its_architecture():
    """LLaVA-OneVision-7B (transformers' default LlavaOnevisionConfig: SigLIP so400m, Qwen2-7B) patches with every
    listed method: those that run on a CLS-free AnyRes-max model."""
    from transformers import LlavaOnevisionConfig

    ov = hconfig.load_config(REPO / "configs/sweeps/llava_onevision_7b.yaml")
    assert ov.models[0].pretrained == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    hsweep._check_methods(ov.models[0], LlavaOnevisionConfig(), ov.methods, [64])


def test_internvl_benchmark_config_runs_on_its_architecture():
    """InternVL3.5-8B (transformers' default InternVLConfig vision tower is InternViT-300M at 448 px; a Qwen3 decoder)
    patches with every listed method (the CLS-scored ones with importance="cls"); pdrop is the one left out."""
    from transformers import InternVLConfig

    import vtprune

    cfg = hconfig.load_config(REPO / "configs/sweeps/internvl3_5_8b.yaml")
    assert cfg.models[0].pretrained == "OpenGVLab/InternVL3_5-8B-HF"
    arch = InternVLConfig(text_config={"model_type": "qwen3"})
    hsweep._check_methods(cfg.models[0], arch, cfg.methods, [64])
    assert {m.method for m in cfg.methods} == {
        m for m in vtprune.list_methods(host="vlm", modality="image") if m != "pdrop"
    } - _refused_on("internvl")


def test_gemma3_benchmark_config_runs_on_its_architecture():
    """Gemma-3-4B-it's architecture (transformers' default Gemma3Config with the 4B's decoder: 34 layers, a global layer
    every 6th, window 1024) patches with every listed method: every registered one but the CLS-scored ones (which
    run there with importance="received", left out as in the Qwen sweeps) and pdrop (whose first stage alone costs
    more than 64 tokens per layer on average)."""
    from transformers import Gemma3Config

    import vtprune

    g3 = hconfig.load_config(REPO / "configs/sweeps/gemma3_4b.yaml")
    assert g3.models[0].pretrained == "google/gemma-3-4b-it"
    cfg = Gemma3Config(
        text_config=dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=1024,
        )
    )
    hsweep._check_methods(g3.models[0], cfg, g3.methods, [64])
    assert {m.method for m in g3.methods} == {
        m
        for m in vtprune.list_methods(host="vlm", modality="image")
        if m not in ("cls", "todre", "visionzip", "vispruner", "pdrop")
    } - _refused_on("gemma3")
