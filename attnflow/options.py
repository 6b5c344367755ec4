"""The options of a run, in groups: each a frozen dataclass that checks itself once, when it is made.

The Python API and the CLI share them: ``attnflow extract`` builds one :class:`ExtractOptions` from its flags,
``attnflow.extract(..., batch_size=8)`` builds the same object from keywords. A value that cannot
work raises :class:`OptionError`, which names the Python parameter (``batch_size: must be at least 1``); the
CLI prints it with its flag instead (``--batch-size: ...``), as a usage error (exit 2).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from .errors import AttnflowError, OptionError
from .capture import MagnitudeUpdate, resolve_blocks
from .choices import StrEnum, choice_values
from .images import CROP_PCT_MIN, READ_TIMEOUT_S, DecodeMode, Interpolation, Preprocess
from .metrics import DEFAULT_ARTIFACT_FACTOR, ArtifactRule, Fusion
from .store.names import Compression, DType, StoreMode

__all__ = [
    "DEVICE_PATTERN", "REPORT_IMAGES", "QUERY_ROWS", "StoreOptions", "RolloutOptions", "ArtifactOptions",
    "FlowOptions", "InputOptions", "RunOptions", "ExtractOptions", "MetricsOptions", "resolve_device",
]

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# attnflow report's options, here so that the CLI reads them without importing the report:
REPORT_IMAGES = 24  # --images: a sample of maps that opens quickly
QUERY_ROWS = ("mean", "heads", "none")  # --query-rows: which of every patch's own rows the page stores for the query view


def _choice(parameter: str, value: Any, allowed: type[StrEnum] | Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed`` (a ``StrEnum`` or plain strings), naming ``parameter``."""
    values = choice_values(allowed) if isinstance(allowed, type) else tuple(allowed)
    if value not in values:
        raise OptionError(parameter, f"choose from {', '.join(values)}, not '{value}'")


@dataclass(frozen=True)
class StoreOptions:
    """What a cache keeps: maps (``full``: every map, ``rows``: the cls/register query rows, ``none``), their
    storage type and compression, the output tokens of the blocks ``token_layers`` (0-based, negative from the
    last; default the last block) in ``tokens_dtype``, and where the magnitude's update is taken."""

    store: str = StoreMode.full.value
    dtype: str = DType.float16.value
    compression: str = Compression.gzip.value
    save_tokens: bool = False
    magnitude: str = MagnitudeUpdate.after_layer_scale.value
    token_layers: tuple[int, ...] = (-1,)
    tokens_dtype: str = DType.float32.value

    def __post_init__(self) -> None:
        _choice("store", self.store, StoreMode)
        _choice("magnitude", self.magnitude, MagnitudeUpdate)
        _choice("dtype", self.dtype, DType)
        _choice("compression", self.compression, Compression)
        _choice("tokens_dtype", self.tokens_dtype, DType)
        object.__setattr__(self, "token_layers", tuple(self.token_layers))  # the CLI and Python may pass a list
        if not self.token_layers:
            raise OptionError("token_layers", "names no block")
        if not self.save_tokens and (self.token_layers != (-1,) or self.tokens_dtype != DType.float32):
            parameter = "token_layers" if self.token_layers != (-1,) else "tokens_dtype"
            raise OptionError(parameter, "chooses how tokens are stored: add {save_tokens}")

    @staticmethod
    def parse_token_layers(text: str) -> tuple[int, ...]:
        """``--token-layers``' text: comma-separated 0-based block indices (negative from the last)."""
        return _parse_blocks("token_layers", text, "comma-separated block indices such as -1,-4,-7")

    def token_blocks(self, num_layers: int) -> tuple[int, ...]:
        """The blocks whose tokens a ``num_layers``-block model stores: 0-based, increasing, each once."""
        return _blocks("token_layers", self.token_layers, num_layers)


@dataclass(frozen=True)
class RolloutOptions:
    """How rollout fuses heads and how much of each fused map it discards."""

    fusion: str = Fusion.mean.value
    discard_ratio: float = 0.0

    def __post_init__(self) -> None:
        _choice("fusion", self.fusion, Fusion)
        if not 0 <= self.discard_ratio < 1:
            raise OptionError("discard_ratio", f"must be in [0, 1), not {self.discard_ratio}")


@dataclass(frozen=True)
class ArtifactOptions:
    """Which patch tokens are high-norm artifacts: above ``artifact_factor`` times the image's median patch norm
    at that block (default :data:`~attnflow.metrics.DEFAULT_ARTIFACT_FACTOR`), or above the absolute
    ``artifact_norm``; not both."""

    artifact_factor: float | None = None
    artifact_norm: float | None = None

    def __post_init__(self) -> None:
        if self.artifact_factor is not None and self.artifact_norm is not None:
            raise OptionError("artifact_norm", "is an absolute threshold and {artifact_factor} one relative to the median: give one of them")
        try:
            self.rule
        except ValueError as e:
            raise OptionError("artifact_norm" if self.artifact_norm is not None else "artifact_factor", str(e)) from None

    @property
    def rule(self) -> ArtifactRule:
        if self.artifact_norm is not None:
            return ArtifactRule(factor=None, norm=self.artifact_norm)
        return ArtifactRule(factor=DEFAULT_ARTIFACT_FACTOR if self.artifact_factor is None else self.artifact_factor)


@dataclass(frozen=True)
class FlowOptions:
    """Exact attention flow (``--flow``, opt-in: it costs a max-flow per patch), read out after the 0-based
    blocks ``flow_layers`` (negative from the end; None: the last block)."""

    flow: bool = False
    flow_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.flow_layers is not None:
            object.__setattr__(self, "flow_layers", tuple(self.flow_layers))  # the CLI and Python may pass a list
            if not self.flow:
                raise OptionError("flow_layers", "chooses the layers of attention flow: add {flow}")
            if not self.flow_layers:
                raise OptionError("flow_layers", "names no layer")

    @staticmethod
    def parse_layers(text: str) -> tuple[int, ...]:
        """``--flow-layers``' text: ``last`` or comma-separated 0-based block indices (negative from the end)."""
        if text.strip() == "last":
            return (-1,)
        return _parse_blocks("flow_layers", text, "last or comma-separated layer indices")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The chosen blocks of a ``num_layers``-block model, 0-based, sorted, each once; () without ``--flow``."""
        if not self.flow:
            return ()
        return _blocks("flow_layers", self.flow_layers if self.flow_layers is not None else (-1,), num_layers)


@dataclass(frozen=True)
class InputOptions:
    """How images are read: the preprocessing preset and overrides, labels from folders, object masks,
    strictness."""

    crop_pct: float | None = None
    interpolation: str | None = None
    labels_from_dirs: bool = False
    masks: Path | None = None
    strict: bool = False
    preprocess: str = Preprocess.timm.value
    decode: str = DecodeMode.cpu.value  # PIL in the workers, or JPEGs in batches on the device

    def __post_init__(self) -> None:
        _choice("preprocess", self.preprocess, Preprocess)
        _choice("decode", self.decode, DecodeMode)
        if self.preprocess == Preprocess.beyond_cls and (self.crop_pct is not None or self.interpolation is not None):
            # the preset is the paper's transform; an override would make it something else under its name
            parameter = "crop_pct" if self.crop_pct is not None else "interpolation"
            raise OptionError(parameter, "{preprocess}=beyond-cls fixes the crop (256 -> 224) and the interpolation (bicubic); drop it")
        if self.crop_pct is not None and not (math.isfinite(self.crop_pct) and CROP_PCT_MIN <= self.crop_pct <= 1):
            raise OptionError("crop_pct", f"must be in [{CROP_PCT_MIN}, 1], not {self.crop_pct}")
        if self.interpolation is not None:
            _choice("interpolation", self.interpolation, Interpolation)


@dataclass(frozen=True)
class RunOptions:
    """How the work runs: batch size, decoding workers and their read timeout, device, autocast, and what happens
    to earlier output."""

    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    amp: bool = False
    resume: bool = False
    overwrite: bool = False
    read_timeout: float = READ_TIMEOUT_S  # seconds an image file's read may receive nothing; 0: no limit

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise OptionError("batch_size", f"must be at least 1, not {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise OptionError("workers", f"must be 0 or more, not {self.workers}")
        if not (math.isfinite(self.read_timeout) and self.read_timeout >= 0):
            raise OptionError("read_timeout", f"takes seconds, 0 or more (0: no limit), not {self.read_timeout}")
        if DEVICE_PATTERN.fullmatch(self.device) is None:
            raise OptionError("device", f"takes auto, cpu, cuda or cuda:N, not '{self.device}'")
        if self.resume and self.overwrite:
            raise OptionError("resume", "continues a run and {overwrite} starts one afresh: give one of them")


def _parse_blocks(parameter: str, text: str, what: str) -> tuple[int, ...]:
    """Comma-separated block indices in ``parameter``'s text (0-based, negative from the last)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise OptionError(parameter, f"takes {what}, not '{text}'") from None


def _blocks(parameter: str, layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """``parameter``'s blocks resolved for a ``num_layers``-block model (:func:`attnflow.capture.resolve_blocks`)."""
    try:
        return resolve_blocks(layers, num_layers)
    except ValueError as e:
        raise OptionError(parameter, str(e)) from None


class _Groups:
    """Options made of groups: built from flat keywords, each routed to the one group with that field."""

    GROUPS: ClassVar[dict[str, type]] = {}

    @classmethod
    def owner(cls, name: str) -> str:
        for group, kind in cls.GROUPS.items():
            if name in {f.name for f in dataclasses.fields(kind)}:
                return group
        raise TypeError(f"{cls.__name__} has no option '{name}'")

    def replace(self, **values: Any):
        """A copy with ``values`` (flat: ``batch_size=8``, ``store="rows"``) put into their groups."""
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            by_group.setdefault(self.owner(name), {})[name] = value
        return dataclasses.replace(
            self, **{group: dataclasses.replace(getattr(self, group), **changed) for group, changed in by_group.items()}
        )


@dataclass(frozen=True)
class ExtractOptions(_Groups):
    """Everything ``attnflow extract`` can be told, besides the model, the images and the output paths."""

    GROUPS: ClassVar[dict[str, type]] = {
        "store": StoreOptions, "rollout": RolloutOptions, "inputs": InputOptions, "run": RunOptions,
        "artifacts": ArtifactOptions, "flow": FlowOptions,
    }

    store: StoreOptions = field(default_factory=StoreOptions)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    artifacts: ArtifactOptions = field(default_factory=ArtifactOptions)
    flow: FlowOptions = field(default_factory=FlowOptions)
    inputs: InputOptions = field(default_factory=InputOptions)
    run: RunOptions = field(default_factory=RunOptions)


@dataclass(frozen=True)
class MetricsOptions(_Groups):
    """Everything ``attnflow metrics`` can be told, besides the cache and the output path."""

    GROUPS: ClassVar[dict[str, type]] = {
        "rollout": RolloutOptions, "run": RunOptions, "artifacts": ArtifactOptions, "flow": FlowOptions,
    }

    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    artifacts: ArtifactOptions = field(default_factory=ArtifactOptions)
    flow: FlowOptions = field(default_factory=FlowOptions)
    run: RunOptions = field(default_factory=lambda: RunOptions(batch_size=16))


def resolve_device(device: str) -> torch.device:
    """``--device`` on this machine: ``auto`` is the first GPU if there is one; a CUDA device this machine
    lacks is a one-line error (the value itself was checked by :class:`RunOptions`)."""
    if DEVICE_PATTERN.fullmatch(device) is None:
        raise OptionError("device", f"takes auto, cpu, cuda or cuda:N, not '{device}'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if count == 0:
            raise AttnflowError(f"--device {device} was asked for, but no CUDA device is available")
        if index >= count:
            raise AttnflowError(f"--device {device} was asked for, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return torch.device(device)
