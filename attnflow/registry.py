"""What a metric is: the declaration every attnflow metric makes once, and what follows from it.

The metrics themselves are declared in :mod:`attnflow.metrics`, each beside the function that computes
it, and collected in :data:`attnflow.metrics.REGISTRY`. Everything else reads them from there: which
metrics a cache allows (:meth:`Registry.available`), their levels (the metrics file's dataset shapes),
``attnflow compare``'s default set and verdicts, the units and axis labels of ``attnflow plot curves``,
the columns of ``attnflow metrics``' per-layer summary, the CLI help and the README's metrics table
(:meth:`Registry.markdown`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator, Literal, Mapping, Sequence

from .layout import TokenLayout

__all__ = [
    "Level", "LEVELS", "LEVEL_SHAPES", "Need", "Y_SHARING", "NAN_REASONS", "UNIT_RANGES", "RANGE_TOLERANCE",
    "Metric", "MetricGroup", "Registry", "check_group_output",
]

Level = Literal["head", "layer", "image"]
LEVELS: tuple[Level, ...] = ("head", "layer", "image")
# The shape of ``metrics/<name>`` in a metrics file, by level: n images, L layers, H heads.
LEVEL_SHAPES = {"head": "(n, L, H)", "layer": "(n, L)", "image": "(n,)"}


class Need(str, Enum):
    """What a metric is computed from; a metric is available when a cache or a capture provides all its
    needs. The value is how the README names it."""

    prefix_rows = "cls row"  # the cls/register query rows: --store rows or full, or maps in flight (--metrics)
    full_maps = "full maps"  # every query's row: --store full, or maps in flight
    masks = "masks"  # object masks (--masks): the cache's fg
    registers = "registers"  # a model with register tokens
    magnitude = "magnitudes"  # the per-token magnitude ratios every cache holds
    token_norm = "token norms"  # every block's output token norms: every cache but those of attnflow 0.1
    flow = "flow (--flow)"  # attention flow maps: opt-in (attnflow metrics --flow), from full maps


# How figures share y ranges between metrics' panels (plot curves --share-y): the panels of metrics with one
# unit share a range, or none do.
Y_SHARING = ("unit", "none")

# Why a metric's value may be NaN (the codes of :attr:`Metric.nan_when`); any other NaN is an error.
NAN_REASONS = {
    "no_cls": "for a model without a cls token",
    "cls_mass": "where the cls row puts no attention on patches",
    "no_mask": "for an image without an object mask",
    "one_patch": "with a single patch",
    "undefined": "where its distribution over patches is undefined",
    "no_artifact": "where no patch is an artifact (artifact_frac is 0)",
    "not_flow_layer": "at a layer --flow-layers did not choose",
}


# The values each unit admits ("share of ..." units: [0, 1]); a metrics file holding a value outside its
# metric's range was not written by attnflow's metrics, and readers refuse it. Units not listed: any value.
UNIT_RANGES = {
    "entropy / ln P": (0.0, 1.0),
    "Gini coefficient": (0.0, 1.0),
    "nats": (0.0, math.inf),
    "input pixels": (0.0, math.inf),
    "update norm / residual norm": (0.0, math.inf),
    "MI / sqrt(ln P · H(p))": (0.0, math.inf),
}
# Rounding slack of a computed value at its range's ends (float32 sums of shares).
RANGE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Metric:
    """One metric, declared once.

    Attributes:
        name: the key of its values and the dataset ``metrics/<name>`` of a metrics file.
        level: what one value describes: one ``head`` of one layer of one image, one ``layer`` of one image,
            or one ``image``.
        needs: the inputs it is computed from (:class:`Need`; any iterable, stored as a frozenset).
        unit: the unit of its values ("nats", "input pixels", "share of the row's attention", ...).
        axis_label: a short name of the quantity for a figure's axis; figures add the unit.
        meaning: what a higher value means, phrased so that "<group> <meaning>" reads as a verdict
            ("MIM cls attention more uniform").
        definition: the formula in the README's notation (one line of Markdown).
        default: whether ``attnflow compare`` and ``attnflow plot curves`` show it without ``--metric``.
        summary: whether it is a column of ``attnflow metrics``' per-layer summary.
        nan_when: the :data:`NAN_REASONS` for which its value may be NaN.
        uniform: what uniform attention over the patches scores, the reference a figure draws: a number
            (1 for a normalised entropy), or the name of an image metric whose mean over a model's images it
            equals (``fg_frac`` for a mass on the object); None where no value is a natural reference.
    """

    name: str
    level: Level
    needs: frozenset[Need]
    unit: str
    axis_label: str
    meaning: str
    definition: str
    default: bool = False
    summary: bool = False
    nan_when: tuple[str, ...] = ()
    uniform: float | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(Need(n) for n in self.needs))  # declarations may pass a set
        if self.level not in LEVELS:
            raise ValueError(f"metric {self.name}: level must be one of {', '.join(LEVELS)}, not '{self.level}'")
        unknown = set(self.nan_when) - set(NAN_REASONS)
        if unknown:
            raise ValueError(f"metric {self.name}: unknown NaN reasons {sorted(unknown)}")
        if not self.needs:
            raise ValueError(f"metric {self.name}: declares no needs")

    @property
    def value_range(self) -> tuple[float, float]:
        """The smallest and largest value the metric can take, from its unit (:data:`UNIT_RANGES`)."""
        if self.unit.startswith("share of"):
            return 0.0, 1.0
        return UNIT_RANGES.get(self.unit, (-math.inf, math.inf))

    @property
    def y_label(self) -> str:
        """The axis label of a figure: quantity and unit."""
        return f"{self.axis_label} ({self.unit})"


@dataclass(frozen=True)
class MetricGroup:
    """Metrics computed together by one function, so that the quantities they share are computed once.

    ``compute`` takes the batch (:class:`attnflow.metrics.Batch`) and, for a ``per_layer`` group, the
    attention of one layer ``(B, H, p or T, T)``; it returns ``{name: tensor}`` for exactly those of
    ``metrics`` that the batch's inputs allow: ``(B, H)`` values for head metrics of a per-layer group,
    ``(B, L)`` for layer metrics, ``(B,)`` for image metrics.
    """

    name: str
    compute: Callable[..., Mapping]
    metrics: tuple[Metric, ...]
    per_layer: bool = False


@dataclass(frozen=True)
class Registry:
    """Every metric attnflow computes, by group, in the order tables and files list them."""

    groups: tuple[MetricGroup, ...]
    _by_name: dict[str, Metric] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Metric] = {}
        for group in self.groups:
            for metric in group.metrics:
                if metric.name in by_name:
                    raise ValueError(f"metric {metric.name} is declared twice")
                by_name[metric.name] = metric
        for metric in by_name.values():
            named = metric.uniform if isinstance(metric.uniform, str) else None
            if named is not None and (named not in by_name or by_name[named].level != "image"):
                raise ValueError(f"metric {metric.name}: its uniform reference '{named}' is not an image metric")
        object.__setattr__(self, "_by_name", by_name)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Metric:
        return self._by_name[name]

    def get(self, name: str) -> Metric | None:
        return self._by_name.get(name)

    def names(self, level: Level | None = None) -> tuple[str, ...]:
        """All metric names, or those of one level."""
        return tuple(m.name for m in self if level is None or m.level == level)

    @property
    def defaults(self) -> tuple[str, ...]:
        """``attnflow compare``'s and ``attnflow plot curves``' metrics when none is asked for."""
        return tuple(m.name for m in self if m.default)

    @property
    def summary(self) -> tuple[str, ...]:
        """The columns of ``attnflow metrics``' per-layer summary."""
        return tuple(m.name for m in self if m.summary)

    @staticmethod
    def provided(
        layout: TokenLayout, *, full_maps: bool, has_fg: bool, has_token_norm: bool = False, has_flow: bool = False
    ) -> frozenset[Need]:
        """The needs a batch meets. Prefix rows and magnitudes are in every cache that has maps."""
        have = {Need.prefix_rows, Need.magnitude}
        if has_flow:
            have.add(Need.flow)
        if has_token_norm:
            have.add(Need.token_norm)
        if full_maps:
            have.add(Need.full_maps)
        if has_fg:
            have.add(Need.masks)
        if layout.num_registers:
            have.add(Need.registers)
        return frozenset(have)

    def available(
        self, layout: TokenLayout, *, full_maps: bool, has_fg: bool, has_token_norm: bool = False, has_flow: bool = False
    ) -> dict[str, Level]:
        """Name -> level of every metric whose needs this layout, store mode, masks, token norms and flow maps meet."""
        have = self.provided(layout, full_maps=full_maps, has_fg=has_fg, has_token_norm=has_token_norm, has_flow=has_flow)
        return {m.name: m.level for m in self if m.needs <= have}

    def markdown(self) -> str:
        """The README's metrics table (``python -m attnflow.metrics --markdown``)."""
        lines = [
            "| name | shape | needs | unit | definition | higher means |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for m in self:
            needs = ", ".join(n.value for n in Need if n in m.needs)
            cells = (f"`{m.name}`", f"{m.level} {LEVEL_SHAPES[m.level]}", needs, m.unit, m.definition, m.meaning)
            lines.append("| " + " | ".join(cells) + " |")
        listed = lambda names: ", ".join(f"`{n}`" for n in names)  # noqa: E731
        lines += [
            "",
            f"- Default set of `attnflow compare` and `attnflow plot curves`: {listed(self.defaults)}.",
            f"- Columns of `attnflow metrics`' per-layer summary: {listed(self.summary)}.",
        ]
        return "\n".join(lines) + "\n"


def check_group_output(group: MetricGroup, values: Mapping, wanted: Sequence[str]) -> None:
    """A group returns exactly the metrics of its own that are ``wanted``: an undeclared or a missing name
    is a bug in attnflow, never a silently dropped or absent dataset."""
    own = {m.name for m in group.metrics}
    expected = own.intersection(wanted)
    if set(values) != expected:
        extra, missing = sorted(set(values) - expected), sorted(expected - set(values))
        raise RuntimeError(f"metric group '{group.name}' returned {extra or 'nothing extra'} beyond its declarations "
                           f"and lacks {missing or 'nothing'}")
