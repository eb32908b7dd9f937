"""The video demo and the real video-benchmark sweeps: the synthetic video task (its answers read back from the
frames' pixels), the harness's video path (arrays and video files become the processor's ``videos``), ratio
budgets and the ``all: {modalities: [video]}`` entry, the video demo config and a run of it on a tiny slice, and the
Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision video sweeps (they parse; their tasks, metrics and methods resolve)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vtprune import video_shapes as V

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "eval" / "tasks" / "vtprune_video_shapes"
VIDEO_SWEEPS = ("qwen25vl_7b_video", "qwen3vl_8b_video", "llava_onevision_7b_video")
VIDEO_TASKS = {"videomme", "longvideobench_val_v", "mlvu_dev", "egoschema_subset"}


# -- the synthetic task ------------------------------------------------------------------------------------------------
def _color_pixels(frame: np.ndarray, color: str) -> np.ndarray:
    """(row, col) of the pixels painted exactly in ``color`` (the background and clutter are grey)."""
    return np.argwhere((frame == np.array(V.COLORS[color], dtype=np.uint8)).all(-1))


def _colors_in(frame: np.ndarray) -> set[str]:
    return {c for c in V.COLOR_NAMES if len(_color_pixels(frame, c))}


@pytest.mark.parametrize("index", range(24))
def test_each_answer_is_what_the_frames_show(index):
    """Read back from the pixels alone (not from the generator's record): the direction of the named colour's
    centroid, the colour present at the end and not at the start, the object count changing."""
    v = V.sample(7, "train", index)
    fr = V.frames(v)
    assert fr.shape == (V.FRAMES, V.FRAME_SIZE, V.FRAME_SIZE, 3) and fr.dtype == np.uint8
    first, last = _colors_in(fr[0]), _colors_in(fr[-1])
    if v.qtype == "move":
        color = v.question.split()[4]
        (r0, c0), (r1, c1) = _color_pixels(fr[0], color).mean(0), _color_pixels(fr[-1], color).mean(0)
        dr, dc = r1 - r0, c1 - c0
        seen = ("down" if dr > 0 else "up") if abs(dr) > abs(dc) else ("right" if dc > 0 else "left")
        assert max(abs(dr), abs(dc)) >= 2 * V.CELL - 1 and seen == v.answer
    elif v.qtype == "color":
        assert last - first == {v.answer} and len(first) == len(last) == 3
    elif v.qtype == "appear":
        assert len(first) == 2 and len(last) == 3
    else:
        assert len(first) == 3 and len(last) == 2
    # the background is static: pixels no object ever covers are equal in every frame
    covered = np.zeros(fr.shape[1:3], dtype=bool)
    for f in fr:
        covered |= ~(f == f[..., :1]).all(-1)  # a coloured (non-grey) pixel
    assert (fr[:, ~covered] == fr[0, ~covered]).all()


def test_the_generator_is_deterministic_and_splits_differ():
    a, b = V.sample(3, "train", 5), V.sample(3, "train", 5)
    assert np.array_equal(V.frames(a), V.frames(b)) and a.answer == b.answer
    assert not np.array_equal(V.frames(a), V.frames(V.sample(3, "test", 5)))
    with pytest.raises(ValueError, match="split must be one of"):
        V.sample(3, "val", 0)
    with pytest.raises(ValueError, match="qtype must be one of"):
        V.make_video(np.random.default_rng(0), "count")


def test_the_committed_test_split_is_what_the_generator_writes(tmp_path):
    rows = V.load_split(TASK / "test.jsonl")
    assert rows == V.load_split(V.write_test_split(tmp_path, V.DEFAULT_SEED, len(rows) // len(V.QUESTION_TYPES)))
    assert {r["type"] for r in rows} == set(V.QUESTION_TYPES)
    assert all(r["answer"] in V.ANSWER_WORDS for r in rows)


def test_the_processor_gives_one_token_per_cell_and_frame():
    processor = V.build_processor()
    v = V.sample(0, "test", 0)
    text = processor.apply_chat_template(V.chat(v.question), add_generation_prompt=True)
    inputs = processor(text=[text], videos=[V.frames(v)], return_tensors="pt")
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert inputs["video_grid_thw"].tolist() == [[V.FRAMES, V.GRID, V.GRID]]
    assert int((inputs["input_ids"] == video_id).sum()) == V.FRAMES * V.GRID * V.GRID
    unk = processor.tokenizer.convert_tokens_to_ids("<unk>")
    assert unk not in inputs["input_ids"][0].tolist()


def _train_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny_video", REPO / "eval" / "train_tiny_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("index", range(16))
def test_training_event_targets_are_the_cells_whose_pixels_change(index):
    """The grounding targets of eval/train_tiny_video.py, read back from the pixels: a token has an event exactly where
    its cell's pixels differ from the previous frame's; a move's arrivals name the cell the answer's direction came
    from (the pixels of that cell one frame earlier hold the object's colour); the answer tokens carry the answer."""
    T = _train_script()
    v = V.sample(11, "train", index)
    fr = V.frames(v).reshape(V.FRAMES, V.GRID, V.CELL, V.GRID, V.CELL, 3)
    changed = (fr[1:] != fr[:-1]).any(axis=(2, 4, 5))  # [FRAMES - 1, GRID, GRID]
    ev, _ = T.events(v)
    ev = ev.reshape(V.FRAMES, V.GRID, V.GRID)
    assert (ev[0] == 0).all() and np.array_equal(ev[1:] > 0, changed)
    answer = T.answer_tokens(v, ev.reshape(V.FRAMES, -1)).reshape(V.FRAMES, V.GRID, V.GRID)
    if v.qtype == "move":
        came_from = {"right": "from-left", "left": "from-right", "down": "from-above", "up": "from-below"}[v.answer]
        color = np.array(V.COLORS[v.question.split()[4]], dtype=np.uint8)
        arrivals = np.argwhere(answer)
        assert len(arrivals) >= 2 and all(T.EVENTS[ev[f, r, c]] == came_from for f, r, c in arrivals)
        for f, r, c in arrivals:
            dr, dc = T.FROM[came_from]
            assert (fr[f - 1, r + dr, :, c + dc] == color).all(-1).any()
    else:
        assert answer.sum() == 1 and np.array_equal(answer, ev > 0)


def test_training_layer0_keys_point_at_the_previous_frames_cell_or_the_sink():
    T = _train_script()
    pos = torch.arange(10, 10 + V.FRAMES * V.GRID * V.GRID)
    keys = T.layer0_keys(pos, sink=3)

    def at(f, r, c):
        return 10 + (f * V.GRID + r) * V.GRID + c

    q = (2 * V.GRID + 1) * V.GRID + 1  # frame 2, row 1, col 1
    assert keys[:, q].tolist() == [at(1, 1, 1), at(1, 1, 0), at(1, 1, 2), at(1, 0, 1)]
    assert (keys[:, : V.GRID * V.GRID] == 3).all()  # frame 0 has no previous frame
    assert keys[1, (3 * V.GRID + 2) * V.GRID + 0] == 3 and keys[2, (3 * V.GRID + 2) * V.GRID + 3] == 3
    assert keys[3, (3 * V.GRID + 0) * V.GRID + 2] == 3 and keys[3, (3 * V.GRID + 1) * V.GRID + 2] == at(2, 0, 2)


def test_shipped_video_model_answers_test_questions():
    """The bundled models/tiny-qwen2vl-video-shapes, loaded through AutoProcessor and the stock class, answers the
    test split's questions (checked against the records' answers, which the pixel test above reads back)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model_dir = REPO / "models" / "tiny-qwen2vl-video-shapes"
    assert (model_dir / "model.safetensors").stat().st_size <= 10 * 2**20
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    assert model.config.text_config.rope_parameters["rope_theta"] == 4.0
    rows = V.load_split(TASK / "test.jsonl")[:40]
    result = _train_script().evaluate(model, AutoProcessor.from_pretrained(model_dir), rows, batch=20)
    assert result["n"] == 40 and result["accuracy"] >= 0.9 and min(result["per_type"].values()) >= 0.8


# -- harness: videos and budgets -------------------------------------------------------------------------------------
pytest.importorskip("lmms_eval")

from vtprune.harness import config as hconfig  # noqa: E402
from vtprune.harness import sweep as hsweep  # noqa: E402
from vtprune.harness.model import budget_options, is_video, is_video_file  # noqa: E402


def test_what_counts_as_a_video():
    from PIL import Image

    frames = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    assert is_video(frames) and is_video([Image.new("RGB", (8, 8))] * 2)
    assert not is_video(frames[0]) and not is_video(Image.new("RGB", (8, 8))) and not is_video([])
    assert is_video_file("/data/clip.MP4") and is_video_file(Path("a.webm"))
    assert not is_video_file("image.png") and not is_video_file(frames)


def test_ratio_budgets_and_the_video_only_entry():
    assert budget_options(0.25) == {"ratio": 0.25} and budget_options(13) == {"keep": 13} and budget_options(None) == {}
    base = {"models": [{"random": "qwen2_vl_video"}], "tasks": [{"task": "vtprune_video_shapes"}]}
    cfg = hconfig.load_config({**base, "methods": ["random"], "budgets": [0.1, 32]})
    assert cfg.budgets == [0.1, 32]
    for bad in (1.0, 0.0, -0.5, True):
        with pytest.raises(ValueError, match="budgets\\[0\\]"):
            hconfig.load_config({**base, "methods": ["random"], "budgets": [bad]})
    with pytest.raises(ValueError, match="downsample"):
        hconfig.load_config({**base, "methods": ["downsample"], "budgets": [0.1]})
    with pytest.raises(ValueError, match="matches no registered method"):
        hconfig.load_config({**base, "methods": [{"all": {"modalities": []}}], "budgets": [8]})
    with pytest.raises(ValueError, match="modalities must be a list"):
        hconfig.load_config({**base, "methods": [{"all": {"modalities": "video"}}], "budgets": [8]})
    with pytest.raises(ValueError, match="num_frames"):
        hconfig.load_config({**base, "methods": ["random"], "budgets": [8], "num_frames": 0})
    got = hconfig.load_config(
        {**base, "methods": [{"all": {"modalities": [], "optional": True}}, "pool"], "budgets": [8]}
    )
    assert [m.method for m in got.methods] == ["pool"]


def _video_only() -> set[str]:
    import vtprune
    from vtprune.registry import get_method

    return {n for n in vtprune.list_methods(host="vlm") if get_method(n).modalities == frozenset({"video"})}


def test_demo_video_config_sweeps_the_video_methods_on_the_bundled_video_model():
    from vtprune.harness.demo import DEMO_VIDEO_CONFIG

    cfg = hconfig.load_config(DEMO_VIDEO_CONFIG)
    assert {m.method for m in cfg.methods} == {"random", "pool", "divprune"} | _video_only()
    assert cfg.budgets == [32, 19, 13]  # 25 / 15 / 10 % of 8 frames x 16 tokens
    assert Path(cfg.models[0].pretrained) == REPO / "models" / "tiny-qwen2vl-video-shapes"
    assert cfg.output_dir.resolve() == REPO / "runs" / "demo_video"
    assert [t.task for t in cfg.tasks] == ["vtprune_video_shapes"]


def test_video_demo_runs_on_a_tiny_slice(tmp_path):
    """The video task through lmms-eval and the harness on a random-weight Qwen2-VL: every video reaches the model
    as 128 visual tokens, the budget keeps 13 of them, and the table is written."""
    from vtprune.harness.demo import run_demo
    from vtprune.harness.sweep import read_results
    from vtprune.timing import num_threads

    config = tmp_path / "demo.yaml"
    config.write_text(
        f"name: video-test\ninclude_path: {REPO / 'eval' / 'tasks'}\ndevice: cpu\ndtype: float32\nbatch_size: 2\n"
        "models:\n  - {random: qwen2_vl_video, seed: 0, name: tiny}\nmethods: [random]\nbudgets: [13]\n"
        "tasks:\n  - {task: vtprune_video_shapes, metric: exact_match, scale: 100}\n"
    )
    with num_threads(1):
        paths = run_demo(config, output_dir=tmp_path / "out", limit=2, progress=False)
    rows = {r["method"]: r for r in read_results(tmp_path / "out")}
    assert rows["none"]["visual_tokens"] == V.FRAMES * V.GRID * V.GRID and rows["random"]["visual_tokens"] == 13
    assert rows["random"]["n"] == 2 and "random" in paths["md"].read_text()


# -- the real video-benchmark sweeps ---------------------------------------------------------------------------------
def _metric_of(tm, task) -> str:
    """The task's metric as the harness resolves it; where the task's utils.py needs a video decoder this
    environment lacks (longvideobench imports decord), read from its YAML instead."""
    try:
        return hsweep._resolve_metric(tm, task)
    except ModuleNotFoundError:
        text = Path(tm.task_index[task.task]["yaml_path"]).read_text()
        assert tm.task_index[task.task]["type"] == "task"
        assert re.search(rf"- metric: {re.escape(task.metric)}\b", text), text
        return task.metric


@pytest.mark.parametrize("name", VIDEO_SWEEPS)
def test_video_benchmark_configs_name_real_tasks_metrics_and_methods(name):
    from transformers import LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen3VLConfig

    cfg = hconfig.load_config(REPO / "configs" / "sweeps" / f"{name}.yaml")
    assert cfg.budgets == [0.25, 0.15, 0.1] and cfg.num_frames == 32
    tasks = {t.task for t in cfg.tasks}
    mvbench = {t for t in tasks if t.startswith("mvbench_")}
    assert tasks - mvbench == VIDEO_TASKS and len(mvbench) == 20
    tm = hsweep._task_manager([], sorted(tasks))
    group = yaml.safe_load(
        (Path(tm.task_index["mvbench"]["yaml_path"])).read_text().split("\n\n")[0]
    )  # the group's own task list
    assert mvbench == set(group["task"])
    for t in cfg.tasks:
        assert _metric_of(tm, t) == t.metric
    # the frame-attention methods run on Qwen2.5-VL only of these; OneVision's videos refuse pool (blended patches)
    frame_attention = {"fastvid", "flashvid"} if name != "qwen25vl_7b_video" else set()
    baselines = {"random", "divprune" if name == "llava_onevision_7b_video" else "pool"}
    assert {m.method for m in cfg.methods} == baselines | (_video_only() - frame_attention)
    arch = {"qwen25vl_7b_video": Qwen2_5_VLConfig, "qwen3vl_8b_video": Qwen3VLConfig}.get(name, LlavaOnevisionConfig)
    hsweep._check_methods(cfg.models[0], arch(), cfg.methods, cfg.budgets)


def test_demo_skips_a_part_whose_model_is_not_in_the_checkout(tmp_path, monkeypatch, capsys):
    from vtprune import cli
    from vtprune.harness import demo

    config = tmp_path / "demo_video.yaml"
    config.write_text(
        "models:\n  - {pretrained: ./no-such-model}\nmethods: [random]\nbudgets: [13]\n"
        "tasks:\n  - {task: vtprune_video_shapes}\n"
    )
    assert demo.missing_models(config) == [str((tmp_path / "no-such-model").resolve())]
    monkeypatch.setattr(demo, "DEMO_VIDEO_CONFIG", config)
    assert cli.main(["demo", "--only", "video", "--limit", "1"]) == 1
    assert "skipped the video demo" in capsys.readouterr().out


def test_the_training_script_saves_a_plain_qwen2_vl_with_its_card(tmp_path):
    """Two training steps (the recipe's code path, not its accuracy): the checkpoint loads with stock classes and
    answers through its processor; the card and the run's record are written."""
    import json
    import sys

    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    sys.path.insert(0, str(REPO / "eval"))
    import train_tiny_video

    out = tmp_path / "model"
    train_tiny_video.main(["--out", str(out), "--steps", "2", "--batch", "2", "--eval-limit", "4", "--threads", "1"])
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps_done"] == 2 and info["test"]["n"] == 4
    assert "tiny-qwen2vl-video-shapes" in (out / "README.md").read_text()
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    v = V.sample(0, "test", 1)
    text = processor.apply_chat_template(V.chat(v.question), add_generation_prompt=True)
    inputs = processor(text=[text], videos=[V.frames(v)], return_tensors="pt")
    with torch.inference_mode():
        assert model.generate(**inputs, max_new_tokens=1).shape[1] == inputs["input_ids"].shape[1] + 1
