"""The sweeps' ``downsample`` row: the unpatched model on images shrunk so that it produces about the budget's visual
tokens (VTC-Bench's row to beat).

Checked against an independent route: image sizes worked out by hand (a 448 x 336 image at 64 tokens of 28 px is 9 x 7
tokens = 252 x 196 px), resized by hand with PIL and run through the stock processor and the unpatched model's
``generate``; token counts read off the processor's ``image_grid_thw``; FLOPs from ``vtprune.flops`` at that grid.
Refusals: fixed-resolution and AnyRes families, budgets below the processor's floor, wrong options, all before any
weight loads in a sweep.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tiny
import torch
from PIL import Image

from vtprune import flops
from vtprune.adapters import get_adapter
from vtprune.adapters.qwen_vl import downsample_grid

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "eval" / "tasks"
PATCH, MERGE, MIN_PIXELS, MAX_PIXELS = 14, 2, 56 * 56, 448 * 448
FACTOR = PATCH * MERGE  # one merged token is 28 x 28 pixels
SPECIAL = {
    tiny.PAD_ID: "<|endoftext|>",
    1: "<|im_start|>",
    2: "<|im_end|>",
    tiny.IMAGE_ID: "<|image_pad|>",
    tiny.VIDEO_ID: "<|video_pad|>",
    tiny.VSTART_ID: "<|vision_start|>",
    tiny.VEND_ID: "<|vision_end|>",
}
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> {% endif %}"
)


def qwen_processor():
    """An offline Qwen2.5-VL processor for the tiny model's vocabulary: word-level tokenizer (``w3`` ... ``w79`` and
    the Qwen special tokens), 14 px patches merged 2 x 2, pixel bounds [56^2, 448^2], a one-turn chat template."""
    pytest.importorskip("torchvision")  # the processors' video halves need it (make test-oldest installs none)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    vocab = {SPECIAL.get(i, f"w{i}"): i for i in range(tiny.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[tiny.PAD_ID]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL[2],
        pad_token=SPECIAL[tiny.PAD_ID],
        additional_special_tokens=[SPECIAL[i] for i in (1, tiny.IMAGE_ID, tiny.VIDEO_ID, tiny.VSTART_ID, tiny.VEND_ID)],
    )
    pixels = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    bounds = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=bounds, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=bounds, **pixels),
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def processor():
    return qwen_processor()


@pytest.fixture(scope="module")
def qwen():
    return tiny.build("qwen2_5_vl").eval()


def image(w, h, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())


def tokens_of(processor, images):
    """Visual tokens per image, as the stock processor produces them (grid t * h * w / merge^2)."""
    grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    return [int(g.prod()) // MERGE**2 for g in grid]


# -- the grid, by hand ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "h,w,budget,grid",
    [
        (336, 448, 64, (7, 9)),  # 4:3: 6.93 x 9.24 -> rows 6|7, cols 9|10; 7 x 9 = 63 is the largest within 64
        (448, 336, 64, (9, 7)),
        (360, 640, 64, (6, 10)),  # 16:9: 6 x 10.67 -> 6 x 10 = 60 (6 x 11 = 66 is over)
        (224, 224, 16, (4, 4)),
        (480, 480, 192, (13, 14)),  # 13.86 per side: 14 x 14 is over; 13 x 14 and 14 x 13 tie: fewer rows
        (336, 448, 128, (9, 14)),  # 9.80 x 13.06: 9 x 13, 9 x 14 = 126, 10 x 13 over
        (100, 1000, 64, (2, 26)),  # 2.53 x 25.3: 2 x 26 = 52 (3 x 25 over); aspect kept to one token per side
        (10, 10000, 50, (1, 50)),  # the short side scales below one token
    ],
)
def test_grid_by_hand(h, w, budget, grid):
    assert downsample_grid(h, w, budget) == grid


def test_grid_respects_the_processor_floor():
    """Qwen3-VL's processor enlarges images below 65536 px = 64 tokens of 32 px: at budget 64 a 4:3 image must be
    exactly 64 tokens, and 8 x 8 is the closest in aspect ratio (4 x 16, 2 x 32, ... are further)."""
    assert downsample_grid(336, 448, 64, least=64) == (8, 8)
    assert downsample_grid(336, 448, 128, least=64) == (9, 14)
    with pytest.raises(ValueError, match="least <= budget"):
        downsample_grid(336, 448, 63, least=64)


def test_grid_stays_within_the_budget_and_close_to_it():
    """Every aspect ratio up to 3:1 and budget 16..576: at most the budget, at least 80 % of it."""
    worst = 1.0
    for budget in (16, 36, 64, 100, 128, 192, 256, 576):
        for h in range(100, 1001, 37):
            for w in range(max(100, h // 3), min(1000, 3 * h) + 1, 41):
                rows, cols = downsample_grid(h, w, budget)
                scale = math.sqrt(budget / (h * w))
                assert rows * cols <= budget
                assert abs(rows - h * scale) < 1 and abs(cols - w * scale) < 1  # the aspect ratio, to a token per side
                worst = min(worst, rows * cols / budget)
    assert worst >= 0.8, worst


# -- the adapter: the resized input gives the tokens reported ------------------------------------------------------
def test_qwen_resizes_to_the_hand_computed_size(qwen, processor):
    adapter = get_adapter(qwen)
    big, wide, small = image(448, 336), image(640, 360, 1), image(112, 112, 2)
    out, proc = adapter.downsample_inputs(processor, [big, wide, small], 64)
    assert proc is processor
    assert [im.size for im in out] == [(9 * 28, 7 * 28), (10 * 28, 6 * 28), (112, 112)]
    assert out[2] is small  # 16 tokens already: never upsampled
    assert tokens_of(processor, out) == [63, 60, 16]
    assert tokens_of(processor, [big])[0] == 12 * 16 and tokens_of(processor, [wide])[0] > 64  # unresized
    by_hand = big.resize((252, 196), resample=Image.BICUBIC)
    assert torch.equal(
        processor.image_processor(images=[out[0]], return_tensors="pt")["pixel_values"],
        processor.image_processor(images=[by_hand], return_tensors="pt")["pixel_values"],
    )


def test_budgets_below_the_processor_floor_are_refused(qwen, processor):
    adapter = get_adapter(qwen)
    adapter.check_downsample(3)  # the config alone does not know the floor
    adapter.check_downsample(4, processor)  # min_pixels = 56^2 = 4 tokens of 28 px
    with pytest.raises(ValueError, match=r"budget 3 is below.*min_pixels=3136.*4 visual tokens.*budget >= 4"):
        adapter.downsample_inputs(processor, [image(448, 336)], 3)
    with pytest.raises(TypeError, match="PIL images; got Tensor"):
        adapter.downsample_inputs(processor, [torch.zeros(3, 8, 8)], 16)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_fixed_resolution_families_refuse(family):
    adapter = get_adapter(tiny.build(family))
    with pytest.raises(ValueError, match=r"one fixed resolution \(\d+ visual tokens.*no token.*'pool'"):
        adapter.check_downsample(8)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_families_refuse(family):
    adapter = get_adapter(tiny.build(family))
    with pytest.raises(ValueError, match=r"AnyRes.*base crop \(16 visual tokens\).*served by qwen2_vl"):
        adapter.check_downsample(8)


# -- the harness: the row equals the unpatched model run by hand on the resized images ------------------------------
class _Request:
    def __init__(self, *args):
        self.args = args


def _by_hand(model, processor, context, img, size, max_new, **processor_kwargs):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    small = img if size is None else img.resize(size, resample=Image.BICUBIC)
    inputs = processor(text=[prompt], images=[small], return_tensors="pt", **processor_kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tiny.PAD_ID)
    seq = inputs["input_ids"].shape[1]
    text = processor.tokenizer.decode(out[0, seq:], skip_special_tokens=True).strip()
    n = int((inputs["input_ids"] == tiny.IMAGE_ID).sum())
    grid = inputs.get("image_grid_thw")
    images = {"image_grid_thw": grid} if grid is not None else {"num_images": inputs["pixel_values"].shape[0]}
    return text, n, flops.prefill_flops(model.config, seq, **images)


def test_harness_row_is_the_unpatched_model_on_the_resized_image(qwen, processor):
    pytest.importorskip("lmms_eval")
    from vtprune.harness.model import VTPrune

    docs = [image(448, 336, 3), image(640, 360, 4), image(112, 112, 5)]
    sizes = [(252, 196), (280, 168), None]  # 63, 60 tokens; the third is 16 tokens already
    contexts = ["w5 w6 w7", "w9 w10", "w11 w12 w13 w14"]
    gen = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
    lm = VTPrune(model=qwen, processor=processor, method="downsample", keep=64, batch_size=1, device="cpu")
    lm.task_dict = {"toy": {"test": docs}}
    requests = [_Request(c, gen, lambda d: [d], i, "toy", "test") for i, c in enumerate(contexts)]
    answers = lm.generate_until(requests)
    records = {r.doc_id: r for r in lm.records}
    for i, (context, img, size) in enumerate(zip(contexts, docs, sizes)):
        text, n, fl = _by_hand(qwen, processor, context, img, size, 5)
        assert answers[i] == text
        r = records[i]
        assert r.visual_tokens_in == r.visual_tokens_kept == n and n <= 64
        assert r.visual_tokens_nominal == 64
        assert r.prefill_tflops == pytest.approx(fl / 1e12)
    assert [records[i].visual_tokens_kept for i in range(3)] == [63, 60, 16]


# -- InternVL: fewer tiles ------------------------------------------------------------------------------------------
INTERNVL_SPECIAL = {**SPECIAL, tiny.IMAGE_ID: "<IMG_CONTEXT>", tiny.VSTART_ID: "<img>", tiny.VEND_ID: "</img>"}


def internvl_processor(max_patches=6):
    """An offline InternVL processor for tests/tiny.py's InternVL: 28 px tiles of 4 tokens, up to ``max_patches``
    tiles (+ thumbnail), ``<IMG_CONTEXT>`` as the image placeholder of the chat template."""
    pytest.importorskip("torchvision")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor, PreTrainedTokenizerFast

    vocab = {INTERNVL_SPECIAL.get(i, f"w{i}"): i for i in range(tiny.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[tiny.PAD_ID]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL[2],
        pad_token=SPECIAL[tiny.PAD_ID],
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<|video_pad|>",
        },
    )
    tile = {"height": 28, "width": 28}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, max_patches=max_patches, min_patches=1, crop_to_patches=True),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=tiny.INTERNVL_TILE_TOKENS,
        chat_template=TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>"),
    )


@pytest.mark.parametrize(
    "budget,max_patches,tokens",
    [
        (100, None, 20),  # 6 tiles allowed already (4 x 1 + thumbnail = 5 tiles of 4 tokens): unchanged
        (12, 2, 12),  # 3 tiles of 4 = 2 tiles + thumbnail: max_patches 2 -> 2 x 1 + thumbnail
        (11, 1, 4),  # 2 tiles would come with a thumbnail (12 > 11): one tile alone
        (4, 1, 4),
    ],
)
def test_internvl_takes_fewer_tiles(budget, max_patches, tokens):
    internvl = tiny.build("internvl")
    processor = internvl_processor()
    wide = image(240, 60)
    images, proc = get_adapter(internvl).downsample_inputs(processor, [wide], budget)
    assert images == [wide] and processor.image_processor.max_patches == 6  # the given processor is left alone
    assert (proc is processor) == (max_patches is None)
    prompt = "w3 <IMG_CONTEXT> w4"
    got = proc(text=[prompt], images=images, return_tensors="pt")
    by_hand = processor(text=[prompt], images=[wide], return_tensors="pt", max_patches=max_patches or 6)
    assert torch.equal(got["input_ids"], by_hand["input_ids"])
    assert torch.equal(got["pixel_values"], by_hand["pixel_values"])
    assert int((got["input_ids"] == tiny.IMAGE_ID).sum()) == tokens <= budget


def test_internvl_refuses_budgets_below_one_tile():
    adapter = get_adapter(tiny.build("internvl"))
    with pytest.raises(ValueError, match=r"budget 3 is below one InternVL tile \(4 visual tokens\).*>= 4 \(one tile\)"):
        adapter.check_downsample(3)


def test_harness_row_on_internvl_is_the_unpatched_model_with_fewer_tiles():
    pytest.importorskip("lmms_eval")
    from vtprune.harness.model import VTPrune

    model, processor = tiny.build("internvl").eval(), internvl_processor()
    docs = [image(240, 60, 6), image(60, 60, 7)]
    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    lm = VTPrune(model=model, processor=processor, method="downsample", keep=12, batch_size=1, device="cpu")
    lm.task_dict = {"toy": {"test": docs}}
    answers = lm.generate_until([_Request("w5 w6", gen, lambda d: [d], i, "toy", "test") for i in range(2)])
    records = {r.doc_id: r for r in lm.records}
    for i, img in enumerate(docs):
        text, n, fl = _by_hand(model, processor, "w5 w6", img, None, 4, max_patches=2)
        assert answers[i] == text
        assert records[i].visual_tokens_kept == n and records[i].prefill_tflops == pytest.approx(fl / 1e12)
    assert [records[i].visual_tokens_kept for i in range(2)] == [12, 4]  # 2 x 1 + thumbnail; a square: one tile


def test_harness_arguments_are_checked():
    pytest.importorskip("lmms_eval")
    from vtprune.harness.model import method_config

    assert method_config("downsample", keep=64) is None
    with pytest.raises(ValueError, match="takes only keep=N.*'ratio': 0.5"):
        method_config("downsample", ratio=0.5)
    with pytest.raises(ValueError, match="takes only keep=N.*'layer': 2"):
        method_config("downsample", keep=64, layer=2)
    with pytest.raises(ValueError, match="needs keep=N"):
        method_config("downsample")


# -- the sweep: pre-check, rows, tables, plots ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_dir(qwen, processor, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen")
    qwen.generation_config.pad_token_id = tiny.PAD_ID
    qwen.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _sweep(model, methods, budgets, **over):
    return {
        "models": [model],
        "methods": methods,
        "budgets": budgets,
        "tasks": [{"task": "vtprune_shapes", "metric": "exact_match"}],
        "include_path": str(TASKS),
        "device": "cpu",
        "dtype": "float32",
        **over,
    }


@pytest.fixture
def no_loading(monkeypatch):
    pytest.importorskip("lmms_eval")
    from vtprune.harness import sweep as hsweep

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was reported")

    monkeypatch.setattr(hsweep, "load_pretrained", refuse)
    monkeypatch.setattr(hsweep, "save_random_model", refuse)


def test_sweep_refuses_before_loading(qwen_dir, no_loading, tmp_path):
    from vtprune.harness import run_sweep

    demo = {"random": "llava", "name": "demo"}
    with pytest.raises(ValueError, match=r"method 'downsample' cannot run on model 'demo'.*fixed resolution \(256"):
        run_sweep(_sweep(demo, ["downsample"], [64]), output_dir=tmp_path)
    qwen = {"pretrained": str(qwen_dir), "name": "q"}
    with pytest.raises(ValueError, match=r"'downsample' cannot run on model 'q' at budget 2: .*min_pixels=3136"):
        run_sweep(_sweep(qwen, ["downsample"], [16, 2]), output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"methods\[0\].*takes only keep=N"):
        run_sweep(_sweep(qwen, [{"method": "downsample", "options": {"layer": 2}}], [16]), output_dir=tmp_path)


def test_sweep_rows_tables_and_plots(qwen_dir, tmp_path):
    pytest.importorskip("lmms_eval")
    from vtprune.harness import build_tables, run_sweep
    from vtprune.harness.plots import series

    model = {"pretrained": str(qwen_dir), "name": "q"}
    rows = run_sweep(_sweep(model, ["downsample", "random"], [16, 36]), output_dir=tmp_path, limit=1, progress=False)
    down = {r["budget"]: r for r in rows if r["method"] == "downsample"}
    base = [r for r in rows if r["method"] == "none"][0]
    assert base["visual_tokens"] == 64  # 224 x 224 shapes images: 8 x 8 tokens of 28 px
    for budget, side in ((16, 4), (36, 6)):  # square images: 4 x 4 and 6 x 6 tokens, i.e. 112 and 168 px
        r = down[budget]
        assert r["method_name"] == "downsample" and r["options"] == {}
        assert r["visual_tokens_in"] == r["visual_tokens"] == side * side and r["visual_tokens_nominal"] == budget
        assert r["prefill_tflops"] < base["prefill_tflops"]
    table = build_tables(rows)[0]
    assert [(t.method, t.budget) for t in table.rows] == [
        ("none", None),
        ("downsample", 36),
        ("random", 36),
        ("downsample", 16),
        ("random", 16),
    ]
    lines = series(rows, x="tokens")["q (limit 1)"]
    assert [x for x, _ in lines["downsample"]] == [36, 16]


def test_shipped_qwen_configs_pass_the_pre_check(monkeypatch):
    """The benchmark configs' downsample row on their architectures and their processors' pixel bounds (Qwen2.5-VL:
    14 px patches, min_pixels 56^2 = 4 tokens; Qwen3-VL and Qwen3.5: 16 px patches, min_pixels 65536 = 64 tokens, the
    smallest budget of the configs), with offline processors of those settings standing in for the hub's."""
    pytest.importorskip("lmms_eval")
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessor, Qwen3_5Config, Qwen3VLConfig

    from vtprune.harness import config as hconfig
    from vtprune.harness import sweep as hsweep

    qwen3_pixels = dict(patch_size=16, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216})
    for name, arch, ip in (
        ("qwen25vl_7b", Qwen2_5_VLConfig(), Qwen2VLImageProcessor()),
        ("qwen3vl_8b", Qwen3VLConfig(), Qwen2VLImageProcessor(**qwen3_pixels)),
        ("qwen35", Qwen3_5Config(), Qwen2VLImageProcessor(**qwen3_pixels)),
    ):
        cfg = hconfig.load_config(REPO / f"configs/sweeps/{name}.yaml")
        rows = [m for m in cfg.methods if m.method == "downsample"]
        assert len(rows) == 1 and cfg.budgets == [64, 128, 192]
        monkeypatch.setattr(hsweep, "_processor", lambda spec, ip=ip: ip)
        hsweep._check_methods(cfg.models[0], arch, rows, cfg.budgets)
        if name != "qwen25vl_7b":
            with pytest.raises(ValueError, match="budget 63 is below.*min_pixels=65536.*64 visual tokens"):
                hsweep._check_methods(cfg.models[0], arch, rows, [63])
