"""``vtprune demo`` / ``make demo``: the bundled tiny VLM swept over every method and budget, with a real accuracy
table and plot (``configs/sweeps/demo.yaml``), then the bundled tiny video VLM swept over the video methods and image
methods applied to videos (``configs/sweeps/demo_video.yaml``)."""

from __future__ import annotations

from pathlib import Path

from .plots import plot_results
from .sweep import run_sweep
from .tables import write_tables

__all__ = ["DEMO_CONFIG", "DEMO_VIDEO_CONFIG", "missing_models", "run_demo"]

#: the demo sweep, in the repository (the bundled model and task are repository files, not package data)
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "demo.yaml"
#: the video part: models/tiny-qwen2vl-video-shapes on eval/tasks/vtprune_video_shapes
DEMO_VIDEO_CONFIG = DEMO_CONFIG.with_name("demo_video.yaml")


def missing_models(config: str | Path) -> list[str]:
    """The local model folders a demo config names that hold no ``config.json`` (e.g. a video model not trained yet
    in this checkout), as given in the config."""
    from .config import load_config

    cfg = load_config(config)
    return [m.pretrained for m in cfg.models if m.random is None and not (Path(m.pretrained) / "config.json").is_file()]


def run_demo(
    config: str | Path = DEMO_CONFIG,
    *,
    output_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the demo sweep from scratch (no resume: every cell is measured anew), then write its tables and
    plots next to ``results.jsonl``. Returns name -> path of what was written (``md``, ``csv``, ``tex``,
    ``flops``, ``tokens``, ``results``)."""
    config = Path(config)
    if not config.is_file():
        raise ValueError(
            f"demo sweep config {str(config)!r} not found: the demo runs from a clone of the vtprune "
            "repository (it uses models/tiny-llava-shapes and eval/tasks/vtprune_shapes)"
        )
    from .config import load_config

    cfg = load_config(config)
    out = (Path(output_dir) if output_dir is not None else cfg.output_dir).resolve()
    rows = run_sweep(cfg, output_dir=out, limit=limit, resume=False, progress=progress)
    paths = dict(write_tables(rows, out))
    paths.update(plot_results(rows, out))
    paths["results"] = out / "results.jsonl"
    return paths
