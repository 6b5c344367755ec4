"""Build a timm ViT and load its weights: from the hub, from a local checkpoint in any common layout, or
(only when asked) at random.

Public entry point: :func:`load_model`. :func:`build_model` also returns what the cache records about the
model (name, checkpoint, its sha256, family, label).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import get_arch_name

from .architectures import ModelAdapter, adapter_for, timm_signature
from .checkpoint import StateDict, file_sha256, read_checkpoint_file, select_state_dict, strip_encoder_prefix
from .demo_models import DEMO_MODELS, create_demo_vit, demo_data_dir
from .errors import AttnflowError, OptionError, first_line
from .notes import note
from .families import FAMILIES, checkpoint_family, infer_family
from .layout import TokenLayout

__all__ = [
    "UNUSED_KEY_PATTERN", "OUTSIDE_CAPTURE_PATTERN", "LoadedModel", "split_model_name", "supported_pretrained",
    "default_label", "build_model", "load_model", "load_state_dict_strict", "check_img_size", "patch_size_of",
    "check_model_options",
]

# Keys a pre-training checkpoint carries that the encoder has no use for (an architecture's own ones, such as
# BEiT's lm_head, are declared by its adapter).
UNUSED_KEY_PATTERN = re.compile(r"^(decoder|mask_token|predictor|head|projector)([._]|$)")

# Encoder parameters that cannot change the attention maps, the magnitudes or the stored tokens (which are
# read before the final norm): missing ones are worth a warning, not a refusal.
OUTSIDE_CAPTURE_PATTERN = re.compile(r"^(norm|fc_norm|head|attn_pool|head_drop)\.")


@dataclass
class LoadedModel:
    """A model ready for capture and what the cache records about where its weights came from."""

    model: nn.Module
    name: str
    checkpoint: str  # absolute path, or "" for hub or random weights
    checkpoint_sha256: str
    weights: str  # "pretrained", "checkpoint" or "random"
    family: str
    label: str
    checkpoint_key: str = ""  # the container inside the checkpoint the weights came from ("" for its top level)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_model(self.model)

    @property
    def adapter(self) -> ModelAdapter:
        """What attnflow knows about the model's architecture: blocks, heads, width, final norm, input size."""
        return adapter_for(self.model, self.name)


def split_model_name(name: str) -> tuple[str, str]:
    """``'vit_base_patch16_224.mae'`` -> ``('vit_base_patch16_224', 'mae')``."""
    arch, _, tag = name.partition(".")
    return arch, tag


def supported_pretrained(family: str | None = None) -> list[tuple[str, str]]:
    """Pretrained ``(name, family)`` pairs timm knows whose architecture attnflow can capture: model,
    block and attention classes all have an adapter (:func:`attnflow.architectures.timm_signature`)."""
    rows = []
    for name in timm.list_pretrained():
        if timm_signature(get_arch_name(name)) is None:
            continue
        fam = infer_family(name)
        if family is None or fam == family:
            rows.append((name, fam))
    return rows


def default_label(name: str, checkpoint: str | Path | None) -> str:
    return f"{name}@{Path(checkpoint).stem}" if checkpoint else name


def check_img_size(img_size: int, patch_size: tuple[int, int]) -> None:
    """``img_size`` must tile into whole patches, at least 2 x 2 of them (an :class:`OptionError` otherwise).

    timm's patch embedding silently drops the pixels beyond the last whole patch (only a model built with
    ``dynamic_img_pad`` pads instead, and its grid then differs from the one the layout records; attnflow
    builds none). With one patch every attention-over-patches metric is trivial or undefined (0 / ln 1).
    """
    step = math.lcm(*patch_size)
    smallest = step * math.ceil(2 * max(patch_size) / step)
    patches = "x".join(map(str, patch_size))
    if img_size < smallest:
        raise OptionError("img_size", f"{img_size} is smaller than 2 x 2 patches of {patches} px; use at least {smallest}")
    if img_size % step:
        below, above = img_size // step * step, (img_size // step + 1) * step
        nearest = f"{below} or {above}" if below >= smallest else str(above)
        raise OptionError("img_size", f"{img_size} is not a multiple of the patch size {patches}: the model would drop the "
                                        f"last {img_size - below} pixels of every row and column; use {nearest}")


def patch_size_of(name: str) -> tuple[int, int] | None:
    """The patch size of timm model (or demo model) ``name``, from a weightless build on the meta device, so
    nothing is downloaded; None when it cannot be built (:func:`build_model` then says why)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = create_demo_vit() if name in DEMO_MODELS else timm.create_model(
                split_model_name(name)[0], pretrained=False, num_classes=0)
        return adapter_for(built).patch_size
    except Exception:  # an unknown or unsupported name: reported by build_model with its own message
        return None


def check_model_options(name: str, checkpoint: str | Path | None = None, *, img_size: int | None = None,
                        checkpoint_key: str | None = None) -> None:
    """Refuse, before any weights are read or downloaded, the options :func:`build_model` could never honour:
    an ``img_size`` that does not tile into whole patches (at least 2 x 2), a ``checkpoint_key`` without a
    checkpoint."""
    if checkpoint_key is not None and checkpoint is None:
        raise OptionError("checkpoint_key", "selects a container inside {checkpoint}; give {checkpoint} too")
    if img_size is not None:
        patch_size = patch_size_of(name)
        if patch_size is not None:
            check_img_size(img_size, patch_size)


def build_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    img_size: int | None = None,
    checkpoint_key: str | None = None,
    random_init: bool = False,
    trust_checkpoint: bool = False,
    family: str | None = None,
    label: str | None = None,
) -> LoadedModel:
    """Create ``name`` with timm and load its weights, see :func:`load_model`."""
    check_model_options(name, checkpoint, img_size=img_size, checkpoint_key=checkpoint_key)
    demo = DEMO_MODELS.get(name)
    seed = None
    if demo is not None and demo.checkpoint is None:  # demo:random: the same weights on every machine
        if checkpoint is not None:
            raise AttnflowError(f"{name} has seeded random weights; it takes no checkpoint")
        family, random_init, seed = family or demo.family, True, demo.seed
    elif demo is not None and not random_init:
        family = family or demo.family
        if checkpoint is None:
            checkpoint = demo_data_dir() / demo.checkpoint
            if not checkpoint.is_file():
                raise AttnflowError(f"the demo checkpoint {checkpoint} is missing from this installation")
    arch, tag = split_model_name(name)
    if demo is None and not timm.is_model(arch):
        raise AttnflowError(f"unknown timm model '{name}' (see `attnflow models` for supported pretrained ViTs)")
    if family is not None and family not in FAMILIES:
        raise AttnflowError(f"unknown family '{family}' (choose from {', '.join(FAMILIES)})")
    if checkpoint is None and not tag and not random_init:
        raise AttnflowError(
            f"'{name}' has no pretrained tag and no --checkpoint was given; pass a checkpoint, a tagged name "
            "(e.g. vit_base_patch16_224.mae), or --random-init to analyse random weights on purpose"
        )
    if checkpoint is not None and random_init:
        raise AttnflowError("--checkpoint and --random-init exclude each other")

    kwargs = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    pretrained = checkpoint is None and not random_init
    if demo is None:
        model = _create(name, pretrained=pretrained, **kwargs)
    elif seed is not None:
        with torch.random.fork_rng(devices=[]):  # a seeded draw leaves the caller's random stream as it was
            torch.manual_seed(seed)
            model = _create_demo(**kwargs)
    else:
        model = _create_demo(**kwargs)
    if img_size is not None:  # the weightless build above may not have known the name's patch size
        check_img_size(img_size, adapter_for(model).patch_size)

    ckpt_path, sha, container = "", "", ""
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser().resolve()
        obj = read_checkpoint_file(ckpt, trust=trust_checkpoint)
        state_dict, container = select_state_dict(obj, checkpoint_key, source=f"checkpoint {ckpt}")
        load_state_dict_strict(model, state_dict, source=str(ckpt), container=container)
        ckpt_path, sha = str(ckpt), file_sha256(ckpt)
        if family is None:
            family = _family_of_checkpoint(name, obj, ckpt)

    model.eval()
    return LoadedModel(
        model=model,
        name=name,
        checkpoint=ckpt_path,
        checkpoint_sha256=sha,
        weights="checkpoint" if checkpoint is not None else ("random" if random_init else "pretrained"),
        # random weights were never pre-trained, whatever family the architecture's name suggests
        family=family or ("untrained" if random_init else infer_family(name)),
        label=label or (name if demo is not None else default_label(name, checkpoint)),
        checkpoint_key=container,
    )


def _family_of_checkpoint(name: str, obj, path: Path) -> str:
    """The family of weights read from a checkpoint: what its layout says of its objective, else the pretrained
    tag the user wrote; never the architecture's name, which says nothing of the weights put into it. Unknown
    otherwise, with a note asking for --family."""
    found = checkpoint_family(obj)
    if found is not None:
        return found[0]
    family = infer_family(name, architecture=False)
    if family == "unknown":
        note(f"the family of {path.name} is unknown (its layout does not show how it was trained and '{name}' has no "
             "pretrained tag); pass --family (e.g. --family mim) so that compare groups it")
    return family


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    img_size: int | None = None,
    checkpoint_key: str | None = None,
    random_init: bool = False,
    trust_checkpoint: bool = False,
) -> nn.Module:
    """The timm model ``name`` alone, in eval mode with its weights loaded; :func:`build_model` gives it with
    its name, label, family, token layout and adapter, as the pipeline uses it.

    Args:
        name: timm model name, with or without a pretrained tag (``vit_small_patch16_224.dino``).
        checkpoint: local ``.pth/.pt/.bin/.tar/.safetensors`` file in any layout :mod:`attnflow.checkpoint`
            understands. Without it a tagged name downloads its weights through timm.
        img_size: build at this input resolution; position embeddings are resampled from the weights.
        checkpoint_key: the container inside the checkpoint (``'student'`` for a DINO student).
        random_init: allow random weights for an untagged name without a checkpoint.
        trust_checkpoint: allow pickles that run code when loaded.
    """
    return build_model(
        name,
        checkpoint,
        img_size=img_size,
        checkpoint_key=checkpoint_key,
        random_init=random_init,
        trust_checkpoint=trust_checkpoint,
        family="unknown",  # the module alone records no family: none is inferred, no note asks for one
    ).model


def _create(name: str, *, pretrained: bool, **kwargs) -> nn.Module:
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # timm and the hub client raise many types; every one is a user-facing failure
        if pretrained:
            raise AttnflowError(
                f"could not fetch pretrained weights for '{name}' ({type(e).__name__}: {first_line(e)}); "
                "download the file elsewhere and pass it with --checkpoint PATH"
            ) from None
        raise AttnflowError(f"cannot build '{name}': {first_line(e)}") from None
    adapter_for(model, name)  # refuses, naming the model and the supported classes
    return model


def _create_demo(num_classes: int = 0, **kwargs) -> nn.Module:
    try:
        return create_demo_vit(**kwargs)  # always headless
    except Exception as e:  # an impossible --img-size, for instance
        raise AttnflowError(f"cannot build the demo model: {first_line(e)}") from None


def _list_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# Tables laid out over the patch grid: timm's checkpoint filters resample them to the model's grid (another
# --img-size, weights trained at another resolution), changing only their token dimension (the second to last).
GRID_TABLE_PATTERN = re.compile(r"(^|\.)(pos_embed|relative_position_bias_table)$")


def _may_become(key: str, stored: torch.Size, wanted: torch.Size) -> bool:
    """Whether a checkpoint's tensor of shape ``stored`` may legitimately be converted to the model's ``wanted``:
    a reshape that keeps every value (timm's old linear patch embedding), or a grid table resampled to the
    model's grid. Any other difference means another architecture (another width, depth or patch size), which
    timm's filter would otherwise silently resample (a patch kernel of another size) or fail on."""
    if stored == wanted or stored.numel() == wanted.numel():
        return True
    return (
        GRID_TABLE_PATTERN.search(key) is not None
        and len(stored) == len(wanted) >= 2
        and stored[:-2] == wanted[:-2]
        and stored[-1] == wanted[-1]
    )


def _misshaped(names: list[str], stored: dict[str, torch.Size], wanted: dict[str, torch.Size]) -> str:
    """``'mis-shaped blocks.0.attn.qkv.weight [576, 100] vs model [576, 192], ...'``: each tensor with the shape
    the file stores (not the one a conversion made of it) and the model's."""
    return "mis-shaped " + _list_keys([f"{k} {list(stored[k])} vs model {list(wanted[k])}" for k in names])


def load_state_dict_strict(model: nn.Module, state_dict: StateDict, *, source: str, container: str = "") -> None:
    """Fit a checkpoint's state dict to ``model``, refusing any partial load that would change attention.

    The prefix is stripped first; the architecture's adapter then drops keys only its pre-training uses,
    converts layouts timm does not know (BEiT's shared relative position bias) and applies timm's own
    checkpoint filter (foreign layouts, position embeddings resampled); decoder/mask-token/predictor/head
    keys are dropped. A tensor whose shape differs from the model's (other than a grid table resampled to
    the model's grid, or a reshape) is refused, naming ``source``, the tensor and both shapes, whether the
    difference shows before or after the conversion or makes the conversion itself fail. ``container`` is
    where the state dict sat in the file (``'teacher'``), for messages.
    """
    model_sd = model.state_dict()
    wanted = {k: v.shape for k, v in model_sd.items()}
    state_dict, prefix = strip_encoder_prefix(state_dict, model_sd.keys())
    stored = {k: v.shape for k, v in state_dict.items()}
    where = ", ".join(part for part in (f"under '{container}'" if container else "", f"prefix '{prefix}'" if prefix else "") if part)
    does_not_fit = f"checkpoint {source}" + (f" ({where})" if where else "") + " does not fit the model: "
    try:
        state_dict = adapter_for(model).convert_checkpoint(state_dict)
    except Exception as e:  # a foreign layout that cannot be converted is the user's file, not our bug
        differing = [k for k in wanted if k in stored and stored[k] != wanted[k]]
        if differing:  # what the conversion could not bring to the model's shape
            raise AttnflowError(does_not_fit + _misshaped(differing, stored, wanted)) from None
        raise AttnflowError(f"checkpoint {source} does not fit {type(model).__name__}: {first_line(e)}") from None

    unexpected = [k for k in state_dict if k not in model_sd and not UNUSED_KEY_PATTERN.match(k)]
    missing = [k for k in model_sd if k not in state_dict]
    misshaped = [
        k for k in model_sd
        if (k in state_dict and state_dict[k].shape != wanted[k]) or (k in stored and not _may_become(k, stored[k], wanted[k]))
    ]
    fatal_missing = [k for k in missing if not OUTSIDE_CAPTURE_PATTERN.match(k)]
    fatal_unexpected = [k for k in unexpected if k.startswith("blocks.")]
    problems = []
    if misshaped:
        problems.append(_misshaped(misshaped, {k: stored[k] if k in stored else state_dict[k].shape for k in misshaped}, wanted))
    if fatal_missing:
        problems.append(f"missing {_list_keys(fatal_missing)}")
    if fatal_unexpected:
        problems.append(f"unexpected {_list_keys(fatal_unexpected)}")
    if problems:
        raise AttnflowError(does_not_fit + "; ".join(problems))
    for key_list, what in ((missing, "missing"), (unexpected, "ignored")):
        if key_list:
            warnings.warn(f"{what} checkpoint keys outside the captured path: {_list_keys(key_list)}", stacklevel=2)
    loadable = {k: v for k, v in state_dict.items() if k in model_sd}
    # checked here, naming the tensor: found later, a NaN weight only shows as maps that are not softmax rows
    broken = [k for k, v in loadable.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise AttnflowError(f"checkpoint {source} holds NaN or infinite values in {_list_keys(broken)}")
    with torch.no_grad():
        model.load_state_dict(loadable, strict=False)
