"""Attention debiasing (fastv debias=True), image sizes for the padding mask, and calibration, against the
eager model's own attention weights."""

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import functional as F
from vtprune.calibration import calibrate
from vtprune.debias import DebiasProfile, builtin_profile, load_profile

K = 2


def _eager_rows(model, inputs):
    """Head-mean attention of the last token over the image tokens at layer K-1 (eager weights), per row."""
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[K - 1][:, :, -1].mean(1)  # [B, S]
    rows = []
    for b in range(att.shape[0]):
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        rows.append(att[b, visual].float())
    return rows


def _kept(model, inputs, **options):
    with vtprune.patched(model, "fastv", layer=K, **options), torch.no_grad():
        model(**inputs)
        return vtprune.stats(model).kept_indices[0]


def test_debiased_fastv_keeps_top_weighted_eager_attention(model_factory):
    model = model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(4, 1, 5)])
    row = _eager_rows(model, inputs)[0]
    for options, weight in (
        (dict(debias_weights="cubic"), F.trend_weights(16, "cubic", F.debias.FASTV_CUBIC)),
        (dict(debias_weights="exp", debias_beta=0.2), torch.exp(-0.2 * torch.arange(16.0))),
        (dict(debias_weights="none"), torch.ones(16)),
    ):
        ref = F.topk_indices(row * weight, 6)
        assert _kept(model, inputs, keep=6, debias=True, **options).tolist() == ref.tolist(), options


def test_padding_mask_from_image_sizes(model_factory):
    model = model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(4, 1, 5)])
    real = F.pad_mask((56, 20), grid=4, resolution=56)  # a wide image: top and bottom rows are padding
    assert 0 < int(real.sum()) < 16
    vtprune.patch(model, "fastv", keep=15, layer=K, debias=True)
    try:
        vtprune.set_image_sizes(model, [(56, 20)])
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
        assert kept.tolist() == real.nonzero().squeeze(1).tolist()  # budget capped at the real patches
        with torch.no_grad():
            model(**inputs)  # sizes apply to one prompt only
        assert vtprune.stats(model).visual_tokens_kept == [15]
        vtprune.set_image_sizes(model, [(56, 20), (30, 30)])
        with pytest.raises(ValueError, match="gave 2 size.*has 1 image"):
            model(**inputs)
    finally:
        vtprune.unpatch(model)


def test_image_sizes_with_beams_follow_their_rows(model_factory):
    """generate repeats each prompt row for beams: every copy of a row reads that row's image size (one size per
    image of the prompt as given)."""
    model = model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(4, 1, 5), (4, 1, 5)])
    wide, tall = F.pad_mask((56, 20), grid=4, resolution=56), F.pad_mask((20, 56), grid=4, resolution=56)
    assert not torch.equal(wide, tall)
    with vtprune.patched(model, "fastv", keep=15, layer=K, debias=True), torch.no_grad():
        vtprune.set_image_sizes(model, [(56, 20), (20, 56)])
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
        kept = [k.tolist() for k in vtprune.stats(model).kept_indices]
    real = [m.nonzero().squeeze(1).tolist() for m in (wide, wide, tall, tall)]
    assert kept == real


def test_image_sizes_bad_inputs(model_factory):
    llava = model_factory("llava")
    with pytest.raises(ValueError, match="not patched"):
        vtprune.set_image_sizes(llava, [(5, 5)])
    with vtprune.patched(llava, "fastv", keep=3, debias=True):
        with pytest.raises(ValueError, match="positive ints"):
            vtprune.set_image_sizes(llava, [(5, 0)])
        with pytest.raises(TypeError, match="list of \\(width, height\\)"):
            vtprune.set_image_sizes(llava, 5)
    qwen = model_factory("qwen2_vl")
    inputs = make_inputs(qwen, "qwen2_vl", [(4, 1, 5)])
    with vtprune.patched(qwen, "fastv", keep=3, debias=True):
        vtprune.set_image_sizes(qwen, [(56, 20)])
        with pytest.raises(ValueError, match="do not pad images to a square"):
            qwen(**inputs)


def test_calibrate_fits_the_mean_eager_attention_trend(model_factory, tmp_path):
    model = model_factory("llava", attn="eager")
    batches = [make_inputs(model, "llava", [(4, 1, 5), (7, 1, 3)], seed=s) for s in range(3)]
    profile = calibrate(model, batches, layer=K, kind="cubic")
    rows = [r for b in batches for r in _eager_rows(model, b)]  # left padding: the last real token is the last column
    mean = torch.stack(rows).mean(0)
    ref = F.fit_trend(mean / mean.sum(), "cubic")
    assert profile.images == 6 and profile.layer == K and profile.model_type == "llava"
    torch.testing.assert_close(torch.tensor(profile.coefficients), torch.tensor(ref), rtol=1e-3, atol=1e-6)
    path = tmp_path / "profile.json"
    profile.save(path)
    assert load_profile(path) == profile
    inputs = batches[0]
    row = _eager_rows(model, inputs)[0]
    expected = F.topk_indices(row * profile.weights(16), 5)
    assert _kept(model, inputs, keep=5, debias=True, debias_weights=str(path)).tolist() == expected.tolist()
    assert not vtprune.is_patched(model)


def test_fit_trend_recovers_known_trends():
    i = torch.arange(100.0, dtype=torch.float64)
    coeffs = (1.0, 2e-3, -1e-5, 3e-8)
    cubic = 0.02 * (coeffs[0] + coeffs[1] * i + coeffs[2] * i**2 + coeffs[3] * i**3)
    torch.testing.assert_close(
        torch.tensor(F.fit_trend(cubic, "cubic"), dtype=torch.float64),
        torch.tensor(coeffs, dtype=torch.float64),
        rtol=1e-6,
        atol=1e-12,
    )
    assert F.fit_trend(0.5 * torch.exp(0.004 * i), "exp")[0] == pytest.approx(0.004, rel=1e-6)
    w = builtin_profile("cubic").weights(576)
    assert w[0] == 1 and 0.35 < float(w[-1]) < 0.37  # the official FastV vector de-weights late tokens


@pytest.mark.parametrize(
    "options,exc,match",
    [
        (dict(debias_weights="exp"), ValueError, r"only apply with debias=True"),
        (dict(debias=True, debias_beta=0.01), ValueError, "applies to debias_weights='exp' only"),
        (dict(debias=True, debias_weights="/nonexistent/profile.json"), ValueError, "does not exist"),
        (dict(debias=True, debias_weights="bogus"), ValueError, r"takes 'cubic', 'exp', 'none' or the path"),
        (
            dict(debias=True, debias_weights="exp", debias_beta=-1.0),
            ValueError,
            "debias_beta must be a finite number >= 0",
        ),
        (dict(debias="yes"), TypeError, "debias must be True or False"),
        (dict(debias=True, pad_threshold=2), ValueError, r"pad_threshold must be a number in \[0, 1\]"),
    ],
)
def test_bad_debias_options(options, exc, match, model_factory):
    with pytest.raises(exc, match=match):
        vtprune.patch(model_factory("llava"), "fastv", keep=4, **options)


def test_profile_file_and_trend_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"kind": "cubic"}')
    with pytest.raises(ValueError, match="not a vtprune debias profile"):
        load_profile(bad)
    with pytest.raises(ValueError, match="needs 4 finite coefficient"):
        DebiasProfile("cubic", (1.0, 2.0))
    with pytest.raises(ValueError, match=r"positive on positions 0..9 only \(it reaches 0 at position 10\)"):
        F.trend_weights(100, "cubic", (1.0, -0.1, 0.0, 0.0))
    with pytest.raises(ValueError, match="kind must be one of"):
        F.fit_trend(torch.ones(10), "linear")


def test_calibrate_command_writes_a_profile_that_fastv_loads(tmp_path):
    pytest.importorskip("lmms_eval")  # the random model with the shapes processor comes from vtprune.harness
    from PIL import Image

    from vtprune.cli import main
    from vtprune.harness.tiny import save_random_model

    model_dir = save_random_model(tmp_path / "model", seed=0)
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (224, 224), (40 * i, 90, 200)).save(p)
        paths.append(str(p))
    out = tmp_path / "profile.json"
    assert main(["calibrate", str(model_dir), *paths, "--layer", "1", "--kind", "exp", "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.kind == "exp" and profile.layer == 1 and profile.images == 2 and profile.source == "calibrated"
    assert main(["calibrate", str(model_dir), str(tmp_path / "missing.png"), "--out", str(out)]) == 2


# -- profiles that cannot weight the model's tokens (refused at calibration and at patch) -----------------------------
def _crossing(coeffs, n):
    """First position 0..n-1 where the cubic is not positive, evaluated with numpy (None: positive on all)."""
    import numpy as np

    values = np.polyval(list(reversed(coeffs)), np.arange(n, dtype=np.float64))
    bad = np.nonzero(values <= 0)[0]
    return int(bad[0]) if bad.size else None


def test_fit_trend_refuses_a_cubic_that_crosses_zero():
    """Positive attention whose least-squares cubic dips below zero before the last position (the bundled model's
    shape: high at the start and the end, near zero between) is refused, naming the coefficients and the crossing;
    an exponential fit of the same data works."""
    import numpy as np

    i = torch.arange(256, dtype=torch.float64)
    attention = torch.exp(-i / 12) + 0.2 * torch.exp((i - 255) / 6) + 1e-4
    coeffs = np.polynomial.polynomial.polyfit(i.numpy(), attention.numpy(), 3)
    coeffs = [float(c / coeffs[0]) for c in coeffs]
    at = _crossing(coeffs, 256)
    assert at is not None and 0 < at < 255
    with pytest.raises(
        ValueError,
        match=rf"fitted on 256 positions, \[1.0, -?0.0.*is positive on positions "
        rf"0..{at - 1} only .* at position {at}\).*kind='exp'",
    ):
        F.fit_trend(attention, "cubic")
    assert F.fit_trend(attention, "exp")[0] < 0


def test_patch_refuses_a_profile_that_does_not_cover_the_image_tokens(model_factory, tmp_path):
    """A profile whose cubic crosses zero at position 10 cannot weight LLaVA's 16 tokens: refused at patch (naming
    the profile, its valid range and the model's count), not from a decoder-layer hook at the first forward."""
    coeffs = (1.0, -0.05, -0.005, 0.0)  # 1 - 0.05 i - 0.005 i^2: positive on 0..9, zero at 10
    assert _crossing(coeffs, 16) == 10
    path = tmp_path / "short.json"
    DebiasProfile("cubic", coeffs, source="calibrated").save(path)
    model = model_factory("llava")
    with pytest.raises(
        ValueError,
        match=rf"debias_weights='{path}' cannot weight this model's 16 visual tokens "
        r"per image: .*positive on positions 0..9 only.*--kind exp",
    ):
        vtprune.patch(model, "fastv", keep=4, debias=True, debias_weights=str(path))
    assert not vtprune.is_patched(model)
    long = tmp_path / "long.json"
    DebiasProfile("cubic", (1.0, -0.05, 0.0, 0.0), source="calibrated").save(long)  # positive on 0..19
    inputs = make_inputs(model, "llava", [(4, 1, 5)])
    assert _kept(model, inputs, keep=4, debias=True, debias_weights=str(long)).numel() == 4


def test_calibrate_command_on_the_bundled_model(tmp_path, capsys):
    """On the bundled model's task images the cubic fit crosses zero inside the 256 tokens: the command refuses it
    in one line (no profile written); --kind exp gives a profile fastv debias=True runs with."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtprune.cli import main

    repo = Path(__file__).resolve().parents[2]
    model_dir = repo / "models" / "tiny-llava-shapes"
    images = [str(p) for p in sorted((repo / "eval" / "tasks" / "vtprune_shapes" / "images").glob("*.png"))[:10]]
    out = tmp_path / "profile.json"
    assert main(["calibrate", str(model_dir), *images, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("vtprune calibrate: error: the cubic trend fitted on 256 positions") and "--kind exp" in line
    assert "Traceback" not in err and not out.exists()
    assert main(["calibrate", str(model_dir), *images, "--kind", "exp", "--out", str(out)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    from PIL import Image

    with Image.open(images[0]) as im:
        inputs = processor(
            images=im.convert("RGB"),
            text=processor.apply_chat_template(messages, add_generation_prompt=True),
            return_tensors="pt",
        )
    with vtprune.patched(model, "fastv", keep=32, debias=True, debias_weights=str(out)), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert vtprune.stats(model).visual_tokens_kept == [32]
