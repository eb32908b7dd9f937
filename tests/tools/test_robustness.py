"""vtprune.robustness: the compression-aware attack, ranking stability, the defense and the `vtprune robustness`
command, on the bundled model and task (a few questions, a few PGD steps)."""

import json
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune import robustness as R
from vtprune import shapes

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "tiny-llava-shapes"
#: the method_options of configs/robustness.yaml: pdrop's budget is what its last drop leaves; cdpruner runs text="llm"
#: (the bundled model has no CLIP text tower for its default, the paper's text="clip")
OPTIONS = {"pdrop": {"budget_kind": "last"}, "cdpruner": {"text": "llm"}}
TASK = REPO / "eval" / "tasks" / "vtprune_shapes"


@pytest.fixture(scope="module")
def runner():
    from vtprune.timing import num_threads

    with num_threads(1):
        yield R.Runner(MODEL)


@pytest.fixture(scope="module")
def items():
    return R.load_items(TASK, limit=4)


def _config(**kw):
    base = dict(
        model=str(MODEL),
        task=str(TASK),
        budgets=[13],
        perturbations=["gauss4"],
        epsilons=[8],
        steps=2,
        transfer_epsilon=None,
        defense_augmentations=1,
        defense_perturbations=["caa"],
        limit=2,
        batch_size=2,
        threads=1,
    )
    base.update(kw)
    return R.RobustnessConfig(**base)


def test_critical_patches_come_from_the_generator():
    scene = shapes.Scene((shapes.Obj("circle", "red", 70, 70, 24), shapes.Obj("square", "blue", 154, 98, 24)), 130, 0)
    per_object = shapes.object_patches(scene)
    assert R.critical_patches(scene, "what color is the circle ?") == per_object[0]
    assert R.critical_patches(scene, "how many squares are there ?") == per_object[1]
    assert R.critical_patches(scene, "is there a blue square ?") == per_object[1]
    assert R.critical_patches(scene, "is there a red square ?") == sorted(per_object[0] + per_object[1])
    assert R.critical_patches(scene, "how many triangles are there ?") == sorted(per_object[0] + per_object[1])
    # the stored images are the generator's scenes
    assert all(it.critical and it.image.shape == (3, 224, 224) for it in R.load_items(TASK, limit=3))
    with pytest.raises(ValueError, match="is not scene"):
        R.load_items(TASK, scene_seed=7, limit=1)


def test_benign_perturbations():
    x = R.load_items(TASK, limit=1)[0].image
    gen = torch.Generator().manual_seed(0)
    for name in R.PERTURBATIONS:
        y = R.perturb(x, name, gen)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        assert torch.equal(y, R.quantize(y)) and not torch.equal(y, x), name
    shifted = R.perturb(x, "shift1", gen)
    assert torch.equal(shifted[:, 1:, 1:], x[:, :-1, :-1])
    noisy = R.perturb(x, "gauss2", gen)
    assert 1.0 / 255 < (noisy - x).std() < 3.0 / 255
    with pytest.raises(ValueError, match="unknown perturbation"):
        R.perturb(x, "blur", gen)


def test_method_options_reach_the_method_and_bad_ones_are_refused(runner):
    from vtprune import api

    assert R.load_config().method_options == OPTIONS  # the committed run's
    runner.method_options = OPTIONS
    try:
        with runner.patch("pdrop", 13):
            assert getattr(runner.pruned, api._ATTR).methods[0].config.budget_kind == "last"
    finally:
        runner.method_options = {}
    with pytest.raises(ValueError, match="cannot be met"):  # without the option: an average of 13 is below the floor
        with runner.patch("pdrop", 13):
            pass
    for bad, message in [
        ([1], "must be a mapping"),
        ({"pdrop": {"keep": 3}}, "other than keep"),
        ({"pdrp": {}}, "pdrop"),
        ({"pdrop": {"budget_kind": "most"}}, "budget_kind"),
    ]:
        with pytest.raises(ValueError, match=message):
            _config(method_options=bad)


@pytest.mark.parametrize("method", vtprune.list_methods(host="vlm", modality="image"))
def test_every_method_is_attacked_or_reported_unreachable(method):
    surrogate, reason = R.surrogate_for(method)
    assert (surrogate is None) != (reason is None)
    if method == "random":
        assert surrogate is None and "never on the image" in reason


@pytest.mark.parametrize("method", ["cls", "fastv", "pdrop"])
def test_exact_surrogates_rank_like_the_method(runner, items, method):
    """An exact surrogate's top-k is the method's own kept set (read from the same inputs, independently); pdrop at
    its first point, the one the audit probes."""
    surrogate, _ = R.surrogate_for(method)
    assert surrogate.exact
    x, text = torch.stack([it.image for it in items]), runner.text_inputs(items)
    seen = []

    def fn(original, image, i):
        kept = original(image)
        top = surrogate.scores(None, image).topk(image.k).indices.sort().values
        seen.append(torch.equal(top.cpu(), kept.cpu()))
        return kept

    runner.method_options = OPTIONS
    try:
        with runner.patch(method, 13), runner.probe(fn), torch.no_grad():
            runner.forward(runner.pruned, x, text)
    finally:
        runner.method_options = {}
    assert seen == [True] * len(items)


@pytest.mark.parametrize(
    "method", [m for m in vtprune.list_methods(host="vlm", modality="image") if R.surrogate_for(m)[0] is not None]
)
def test_every_surrogate_has_a_gradient_on_the_pixels(runner, items, method):
    """The attack can move every reachable method: its surrogate scores are not detached from the image (a signal
    computed under no_grad would leave PGD at the clean image)."""
    surrogate, _ = R.surrogate_for(method)
    one = items[:1]
    text = runner.text_inputs(one)
    x = torch.stack([it.image for it in one]).requires_grad_(True)
    runner.method_options = OPTIONS
    try:
        with runner.patch(method, 13):
            objective = R.caa_objective(runner, x, text, one, surrogate, 13, penalty=0.0)
    finally:
        runner.method_options = {}
    (grad,) = torch.autograd.grad(objective.sum(), x, allow_unused=True)
    critical_room = bool(objective.detach()[0] < 0)  # a critical token still among the top k: something to push
    assert critical_room and grad is not None and bool(grad.abs().sum() > 0)


def test_multi_point_methods_are_audited_at_their_first_point(runner, items):
    x, text = torch.stack([it.image for it in items]), runner.text_inputs(items)
    runner.method_options = OPTIONS
    try:
        with runner.patch("pdrop", 13):
            _, kept, _ = runner.predict_pruned(x, text)
            stages = vtprune.stats(runner.pruned).stages
            assert runner.selections(x, text) == kept  # the stopped forward probes the same point
    finally:
        runner.method_options = {}
    assert len(stages) == 2 and stages[-1].visual_tokens_kept == [13] * len(items)
    assert [len(k) for k in kept] == stages[0].visual_tokens_kept and all(len(k) > 13 for k in kept)


def test_attack_raises_its_objective_respects_the_ball_and_drops_critical_tokens(runner, items):
    eps = 8 / 255
    x0 = torch.stack([it.image for it in items])
    x_adv, history = R.caa_attack(runner, items, "cls", 13, eps, steps=4)
    assert history.shape == (5, len(items))
    room = history[0] < 0  # rows with critical tokens to push out (or a threatened unpruned answer)
    assert bool(room.any()) and bool((history.max(0).values > history[0])[room].all())
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    assert (x_adv - x0).abs().max() <= eps + 1e-6
    assert torch.equal(x_adv, R.quantize(x_adv))
    text = runner.text_inputs(items)
    with runner.patch("cls", 13):  # the real selection (not the surrogate) keeps fewer critical tokens
        _, clean, _ = runner.predict_pruned(x0, text)
        _, attacked, _ = runner.predict_pruned(x_adv, text)

    def critical_kept(kept):
        return sum(len(set(k) & set(it.critical)) for k, it in zip(kept, items))

    assert critical_kept(attacked) < critical_kept(clean)
    # the patched model still answers like a freshly patched one after the attack's interrupted forwards
    from transformers import LlavaForConditionalGeneration

    fresh = LlavaForConditionalGeneration.from_pretrained(MODEL).eval()
    with runner.patch("cls", 13), vtprune.patched(fresh, "cls", keep=13), torch.no_grad():
        ours, _, _ = runner.predict_pruned(x_adv, text)
        ref = runner.forward(fresh, x_adv, text).logits[:, -1].argmax(-1)
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="cannot reach 'random'"):
        R.caa_attack(runner, items, "random", 13, eps)


def test_keep_everything_has_no_attack_success_and_random_is_stable():
    rows = R.run_robustness(_config(methods=["random", "cls"], budgets=[256, 13]), progress=False, write=False)

    def get(method, budget, pert, defense=None):
        return [
            r
            for r in rows
            if (r["method"], r["budget"], r["perturbation"], r.get("defense")) == (method, budget, pert, defense)
        ]

    for r in get("cls", 256, "caa"):
        assert r["attack_success"] == 0 and r["kept_jaccard"] == 1 and r["accuracy"] == r["accuracy_unpruned"]
    for pert in ("none", "gauss4"):
        for r in get("random", 13, pert):
            assert r["kept_jaccard"] == 1.0
    (unreachable,) = get("random", 13, "caa")
    assert unreachable["reachable"] is False and "never on the image" in unreachable["reason"]
    (moved,) = get("cls", 13, "gauss4")
    assert moved["kept_jaccard"] < 1  # the metric can fail
    assert get("cls", 13, "caa", "vote")[0]["defense_select_ms"] > 0


def test_cli_end_to_end_and_table_column(tmp_path):
    from vtprune import cli

    config = tmp_path / "robustness.yaml"
    config.write_text(
        f"model: {MODEL}\ntask: {TASK}\nmethods: [random, fastv]\nbudgets: [13]\nperturbations: "
        "[shift1]\nepsilons: [4]\nsteps: 2\ntransfer_epsilon: 4\ndefense_augmentations: 1\n"
        "defense_perturbations: [caa]\nbatch_size: 2\nthreads: 1\n"
    )
    out = tmp_path / "out"
    assert cli.main(["robustness", "--config", str(config), "--limit", "2", "--output-dir", str(out), "--quiet"]) == 0
    for name in (
        "results.jsonl",
        "table.md",
        "table.csv",
        "transfer.csv",
        "stability_vs_budget.png",
        "accuracy_under_attack.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "results.partial.jsonl").exists()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"random", "fastv"}
    for r in rows:
        assert {
            "method",
            "budget",
            "perturbation",
            "kept_jaccard",
            "accuracy",
            "accuracy_unpruned",
            "attack_success",
        } <= set(r)
    assert {r["perturbation"] for r in rows} == {"none", "shift1", "caa", "transfer"}
    table = (out / "table.md").read_text()
    assert "unreachable" in table and "fastv" in table
    # a sweep's results with these rows appended get a CAA column in `vtprune table` (the harness: eval extra)
    pytest.importorskip("lmms_eval")
    from vtprune.harness.tables import build_tables, to_markdown

    sweep = [
        {
            "model": "tiny-llava-shapes",
            "method": m,
            "budget": b,
            "task": "t",
            "value": 0.5,
            "score": 50.0,
            "max": 100.0,
            "limit": None,
            "n": 2,
        }
        for m, b in (("none", None), ("fastv", 13), ("random", 13))
    ]
    md = to_markdown(build_tables(sweep + rows))
    fastv_caa = next(r for r in rows if (r["method"], r["perturbation"]) == ("fastv", "caa"))["attack_success"]
    assert "CAA succ. % (4/255)" in md
    assert f"{100 * fastv_caa:.1f} |" in next(line for line in md.splitlines() if line.startswith("| fastv"))
    assert "CAA" not in to_markdown(build_tables(sweep))
    with pytest.raises(ValueError, match="unknown perturbation"):
        R.RobustnessConfig(perturbations=["blur"])
    with pytest.raises(ValueError, match="transfer_epsilon"):
        R.RobustnessConfig(epsilons=[4], transfer_epsilon=8)
    assert cli.main(["robustness", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_a_method_that_cannot_run_on_the_model_is_reported(monkeypatch, tmp_path):
    original = R.Runner.patch

    def patch(self, method, budget):
        if method == "fastv":
            raise ValueError("fastv: not on this model (test)")
        return original(self, method, budget)

    monkeypatch.setattr(R.Runner, "patch", patch)
    rows = R.run_robustness(_config(methods=["fastv"]), output_dir=tmp_path, progress=False)
    assert rows and all(r["reachable"] is False and "not on this model" in r["reason"] for r in rows)
    assert "unreachable: cannot patch" in (tmp_path / "table.md").read_text()
