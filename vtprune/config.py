"""Method configs: one dataclass per method, sharing the budget fields and a JSON round trip.

Every method config derives from :class:`PruneConfig`, which holds the token budget:
``keep=N`` (visual tokens kept per image) or ``ratio=r`` (fraction kept, 0 < r <= 1), never both.
Method-specific configs live beside their method in ``vtprune/methods/`` and are re-exported by ``vtprune``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

#: how kept tokens are numbered: their original position ids, or consecutively ("compact", 1-D positions only)
POSITIONS = ("original", "compact")


def check_int_option(name: str, value, minimum: int = 0, *, optional: bool = False, hint: str = "") -> None:
    """Validate an int option of a method config (a bool is not an int; ``optional``: None is allowed)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{hint}, got {value!r}")


EMPTY_FRAMES = ("refill", "allow")

#: how a vision-stage method's video budget is shared among the frames: the method sees the whole video ("video"),
#: or the engine gives each frame a budget (vtprune.functional.frame_budgets' rules) and runs the method per frame
FRAME_BUDGETS = ("video", "uniform", "uniqueness", "segments")

_COMMON_OPTIONS = """    Common options (every method, :class:`vtprune.PruneConfig`):

    * ``keep`` / ``ratio``: the budget, visual tokens kept per image (``keep=N``) or the fraction kept
      (``ratio=r``, 0 < r <= 1); exactly one of them.
    * ``positions`` (``"original"``): kept tokens keep their position ids; ``"compact"``: renumbered 0, 1, ...
      (1-D positions only).
    * ``empty_frames`` (``"refill"``): a video frame left without tokens gets its centre token back;
      ``"allow"``: the selection stands.
    * ``frame_budget`` (``"video"``): a vision-stage method selects over a whole video; ``"uniform"``,
      ``"uniqueness"`` (VidCom2) or ``"segments"`` (DySeg): the engine splits the video's budget among its frames
      (:func:`vtprune.functional.frame_budgets`) and runs the method once per frame (images are unaffected).
"""


#: the registry's lookup of a method name (``vtprune.registry.get_method``, which sets it when imported: the registry
#: depends on this module, never the reverse); ``PruneConfig.from_dict`` builds configs through it
method_record: Callable[[str], Any] | None = None


@dataclasses.dataclass
class PruneConfig:
    """Budget shared by all methods. Exactly one of ``keep`` / ``ratio`` must be given. ``positions``: kept
    tokens keep their original position ids (default; decode continues from the unpruned length) or
    ``"compact"``: they are renumbered 0, 1, ... as if the dropped tokens had never been in the prompt (decode
    continues from the pruned length; 1-D positions only, i.e. LLaVA families)."""

    keep: int | None = None
    ratio: float | None = None
    positions: str = "original"
    #: a video whose frames are separate blocks (Qwen3-VL / Qwen3.5: timestamp text between frames) has one budget
    #: for the whole video. ``"refill"``: a frame the method left without tokens gets its centre token back, taken
    #: from the frame keeping the most (possible when the budget covers a token per frame); ``"allow"``: the
    #: method's selection stands, frames may keep no token
    empty_frames: str = "refill"
    #: ``"video"``: a vision-stage method selects over a whole video unit; ``"uniform"`` / ``"uniqueness"`` /
    #: ``"segments"``: the engine shares the video's budget among its frames by that rule
    #: (:func:`vtprune.functional.frame_budgets`) and calls the method once per frame (``vtprune/engine/frames.py``).
    #: Images are unaffected; a method pruning inside the LLM accepts only ``"video"``
    frame_budget: str = "video"

    #: registry name of the method this config belongs to (set by ``@register_method``)
    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        """A method config's docstring lists its own options; the budget and common options are appended here, so
        ``help(vtprune.FastVConfig)`` names every field."""
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "Common options" not in cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + "\n\n" + _COMMON_OPTIONS

    def __post_init__(self) -> None:
        self.check_budget_fields()
        if self.empty_frames not in EMPTY_FRAMES:
            raise ValueError(f"empty_frames must be one of {EMPTY_FRAMES}, got {self.empty_frames!r}")
        if self.frame_budget not in FRAME_BUDGETS:
            raise ValueError(
                f"frame_budget must be one of {FRAME_BUDGETS} (how a video's budget is shared among its frames), "
                f"got {self.frame_budget!r}"
            )
        if self.frame_budget != "video" and self.method and method_record is not None:
            if (stage := method_record(self.method).stage) != "vision":
                raise ValueError(
                    f"frame_budget={self.frame_budget!r} needs a method that prunes at the vision entry; "
                    f"{self.method!r} prunes inside the LLM (stage {stage!r}): use frame_budget='video'"
                )
        if self.positions not in POSITIONS:
            raise ValueError(
                f"positions must be one of {POSITIONS} (kept tokens keep their position ids, or are "
                f"renumbered consecutively), got {self.positions!r}"
            )

    def check_budget_fields(self) -> None:
        """Refuse a missing, doubled or malformed budget (``keep`` / ``ratio``); a method with a budget of its own
        (``evs``'s pruning rate ``q``) overrides this."""
        if self.keep is not None and self.ratio is not None:
            raise ValueError(f"give either keep= or ratio=, not both (got keep={self.keep!r}, ratio={self.ratio!r})")
        if self.keep is None and self.ratio is None:
            raise ValueError(
                f"{type(self).__name__} needs a budget: keep=N (visual tokens kept per image, N >= 1) "
                "or ratio=r (fraction kept, 0 < r <= 1)"
            )
        if self.keep is not None:
            # numbers.Integral: numpy ints too (np.bool_ is not one), stored as a Python int
            if isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Integral):
                raise TypeError(f"keep must be an int >= 1, got {self.keep!r} ({type(self.keep).__name__})")
            self.keep = int(self.keep)
            if self.keep < 1:
                raise ValueError(f"keep must be >= 1 (visual tokens kept per image), got {self.keep}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real):  # numpy floats too
                raise TypeError(f"ratio must be a float in (0, 1], got {self.ratio!r} ({type(self.ratio).__name__})")
            if not (0.0 < float(self.ratio) <= 1.0) or math.isnan(self.ratio):
                raise ValueError(f"ratio must be in (0, 1] (fraction of visual tokens kept), got {self.ratio}")
            self.ratio = float(self.ratio)

    def budget(self, n: int) -> int:
        """Number of tokens to keep out of ``n`` visual tokens of one image (``min(keep, n)`` or
        ``max(1, round(ratio * n))``)."""
        if n <= 0:
            return 0
        if self.keep is not None:
            return min(self.keep, n)
        return min(n, max(1, round(self.ratio * n)))

    # -- JSON round trip ---------------------------------------------------------------------------
    #: the version of the dict form (``to_dict``'s ``config_version``; not ``version``, which is an option of some
    #: methods, e.g. sparsevlm's); :meth:`from_dict` reads every version up to it, migrating older ones
    #: (:meth:`migrate`), and refuses newer ones
    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, "config_version": VERSION, **options}``: what :meth:`from_dict` reads back."""
        return {"method": self.method, "config_version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def migrate(cls, options: dict[str, Any], version: int) -> dict[str, Any]:
        """A method's options as written by dict-form ``version`` (older than :data:`VERSION`), as this version reads
        them. Version 0 (dicts written before versions existed) reads as is; a method whose options change overrides
        this and migrates from each older version."""
        return options

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        """The config a dict with a ``method`` key describes (``to_dict``'s output; an optional
        ``config_version``, older ones migrated, newer ones refused with ``ValueError``). Unknown options raise
        ``TypeError`` (as the same options given as keywords to ``vtprune.patch`` or the config class do);
        called on a method's config class (``FastVConfig.from_dict``), a dict of another method raises
        ``ValueError``."""
        if not isinstance(data, dict) or "method" not in data:
            raise ValueError(f"a config dict needs a 'method' key, got {data!r}")
        data = dict(data)
        spec = method_record(data.pop("method"))
        version = data.pop("config_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= spec.config_cls.VERSION:
            raise ValueError(
                f"a {spec.name!r} config dict of version {version!r}; this vtprune reads versions 0 to "
                f"{spec.config_cls.VERSION} (a newer vtprune wrote it: upgrade vtprune)"
            )
        if version < spec.config_cls.VERSION:
            data = spec.config_cls.migrate(data, version)
        return cls._checked(spec.make_config(data))

    @classmethod
    def from_json(cls, text: str) -> PruneConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def _checked(cls, config: PruneConfig, where: str = "") -> PruneConfig:
        if not isinstance(config, cls):
            raise ValueError(
                f"{cls.__name__}.from_* was given {where}a config of method {config.method!r} "
                f"({type(config).__name__}), not of {cls.method!r}; use PruneConfig.from_* (or "
                f"{type(config).__name__}) to read any method's config"
            )
        return config

    @classmethod
    def from_yaml(cls, path) -> PruneConfig | list[PruneConfig]:
        """A config from a YAML mapping with a ``method`` key (the presets in ``configs/methods/*.yaml``), or a
        schedule from a YAML list of such mappings (``vtprune.patch`` takes either). Called on a method's config
        class (``FastVConfig.from_yaml``), a file of another method (or a schedule) raises ``ValueError``."""
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f)
        if isinstance(data, list):
            if not data:
                raise ValueError(f"{str(path)!r} holds an empty list: a schedule needs one or more method mappings")
            for i, item in enumerate(data):
                if not isinstance(item, dict):
                    raise ValueError(
                        f"{str(path)!r}: schedule element {i} is a {type(item).__name__} ({item!r}); "
                        "each element must be a mapping with a 'method' key and its options"
                    )
            if cls is not PruneConfig:
                raise ValueError(
                    f"{cls.__name__}.from_yaml: {str(path)!r} holds a schedule (a list of "
                    f"{len(data)} methods); read it with PruneConfig.from_yaml"
                )
            return [PruneConfig.from_dict(item) for item in data]
        if not isinstance(data, dict):
            raise ValueError(
                f"{str(path)!r} must hold a YAML mapping with a 'method' key (or a list of them: a "
                f"schedule), got {type(data).__name__}"
            )
        return cls._checked(PruneConfig.from_dict(data), where=f"{str(path)!r}, ")
