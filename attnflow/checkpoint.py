"""Read a checkpoint file and find the encoder's state dict inside it.

Researchers hold weights in the layouts their training code wrote: a raw state dict, MAE/SimMIM/DeiT's
``{'model': sd}``, MoCo v3's ``{'state_dict': sd}`` with ``module.base_encoder.`` prefixes, DINO/iBOT's
``{'teacher': ..., 'student': ...}`` with ``backbone.`` prefixes, I-JEPA's ``{'encoder', 'target_encoder',
...}``. This module only unwraps and strips prefixes; fitting the weights to a model (timm's checkpoint
filter, position-embedding resampling, the strict key check) happens in :mod:`attnflow.models`.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import AttnflowError, first_line

__all__ = [
    "StateDict", "CONTAINER_KEYS", "ENCODER_PREFIXES", "PICKLE_SUFFIXES", "file_sha256", "read_checkpoint_file",
    "select_state_dict", "strip_encoder_prefix",
]

StateDict = dict[str, torch.Tensor]

# Nested containers, in the order they are preferred when several are present: the teacher (DINO, iBOT)
# and the target encoder (I-JEPA) are the networks those papers evaluate.
CONTAINER_KEYS = ("teacher", "target_encoder", "model", "state_dict", "module", "encoder", "student")

# Prefixes that wrap the encoder's own names, longest first.
ENCODER_PREFIXES = (
    "module.base_encoder.",
    "base_encoder.",
    "module.backbone.",
    "backbone.",
    "module.encoder.",
    "encoder.",
    "module.",
)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint_file(path: str | Path, *, trust: bool = False) -> Any:
    """Load a checkpoint's object without running code from it.

    ``.safetensors`` files go through safetensors; everything else through
    ``torch.load(weights_only=True)``, which refuses pickles that would execute code. ``trust=True`` allows
    a full pickle load, for files the user vouches for.
    """
    path = Path(path)
    if not path.is_file():
        raise AttnflowError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AttnflowError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:
            raise AttnflowError(f"cannot read checkpoint {path}: {first_line(e)}") from None
        raise AttnflowError(
            f"checkpoint {path} is a pickle that needs code to load and was refused; "
            "if you trust the file, pass --trust-checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        raise AttnflowError(f"cannot read checkpoint {path}: {first_line(e)}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(obj: Any, checkpoint_key: str | None = None, *, source: str = "checkpoint") -> tuple[StateDict, str]:
    """Descend into known containers until a flat ``name -> tensor`` mapping is reached.

    Returns the state dict and the container path taken (``""`` for a raw state dict, ``"teacher"``...).
    ``checkpoint_key`` picks a container explicitly; a dotted path (``"model.ema"``) descends several.
    """
    path: list[str] = []
    if checkpoint_key:
        for part in checkpoint_key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                available = ", ".join(sorted(str(k) for k in obj)) if isinstance(obj, Mapping) else "none"
                raise AttnflowError(f"{source} has no key '{checkpoint_key}' (top-level keys: {available})")
            obj = obj[part]
            path.append(part)
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        nested = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if nested is None:
            break
        obj = obj[nested]
        path.append(nested)
    if not isinstance(obj, Mapping):
        raise AttnflowError(f"{source} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        keys = ", ".join(sorted(str(k) for k in obj)[:12])
        raise AttnflowError(f"{source} holds no tensors at '{'.'.join(path) or 'top level'}' (keys: {keys})")
    return tensors, ".".join(path)


def strip_encoder_prefix(state_dict: StateDict, model_keys: Iterable[str]) -> tuple[StateDict, str]:
    """Keep the keys under the prefix that names the most of the model's own keys, without that prefix.

    Choosing by match count rather than by the first prefix present is what separates MoCo v3's
    ``module.base_encoder.`` from its ``module.momentum_encoder.`` twin, and DINO's ``backbone.`` from its
    projection ``head.``.
    """
    wanted = set(model_keys)
    best_prefix, best_hits = "", sum(k in wanted for k in state_dict)
    for prefix in ENCODER_PREFIXES:
        hits = sum(k.startswith(prefix) and k[len(prefix):] in wanted for k in state_dict)
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits
    if not best_prefix:
        return dict(state_dict), ""
    n = len(best_prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(best_prefix)}, best_prefix
