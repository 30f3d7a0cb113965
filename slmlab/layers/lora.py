"""LoRA: a frozen linear layer plus a trainable low-rank update, stored in PEFT's format.

Hu et al. (2021) freeze a pretrained weight W and learn its change as a product of two thin
matrices, W + (α/r)·B·A with A (r × in) and B (out × r): r·(in + out) parameters instead of
in·out. B starts at zero, so training starts from the pretrained model exactly; rsLoRA (Kalajdzievski,
2023) scales by α/√r instead, so that larger ranks keep learning as fast. The update can be
merged into W for inference (nothing is left to compute) and taken out again.

`apply_lora_(model, LoraConfig(...))` wraps the named linear layers through the model's one
swap helper. An adapter is saved as PEFT saves one, ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's tensor names, so ``peft.PeftModel.from_pretrained``
puts it on the transformers model, and `load_adapter_` reads PEFT's adapters back. A checkpoint
directory that holds an adapter beside its weights is loaded with the adapter applied
(`slmlab.checkpoint.load`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models.swap import LINEAR_TARGETS, MAMBA, swap_linears
from .quantized import QuantLinear

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRALinear",
    "LoraConfig",
    "LoraError",
    "adapter_bytes",
    "adapter_files",
    "apply_lora_",
    "join_lora_state",
    "load_adapter_",
    "lora_config_of",
    "lora_modules",
    "merge_lora_",
    "read_adapter",
    "split_lora_state",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PEFT's names: the PeftModel, then the transformers model


class LoraError(ValueError):
    """A LoRA setting or adapter that cannot be applied; the message names the field."""


@dataclass(frozen=True)
class LoraConfig:
    """`r`: the update's rank; `alpha`: its scale (α/r, or α/√r with `rslora`); `dropout`: on
    the update's input while training; `targets`: the layers' names (their last part, as
    PEFT's ``target_modules``: ``q_proj`` ... ``down_proj``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=LINEAR_TARGETS)
    rslora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"lora r must be a positive integer, got {self.r!r}")
        real = isinstance(self.alpha, int | float) and not isinstance(self.alpha, bool)
        if not (real and math.isfinite(self.alpha) and self.alpha > 0):
            raise LoraError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise LoraError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise LoraError(f"lora targets must be layer names, got {list(self.targets)!r}")
        if not isinstance(self.rslora, bool):
            raise LoraError(f"lora rslora must be true or false, got {self.rslora!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    def to_peft(self, base_model: str | None = None) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for this config."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets),
            "use_rslora": self.rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, settings: dict[str, Any], where: str) -> LoraConfig:
        """The config of PEFT's ``adapter_config.json`` (what slmlab's LoRA can compute of it)."""
        if not isinstance(settings, dict):
            raise LoraError(f"{where}: must hold a JSON object")
        if settings.get("peft_type") != "LORA":
            raise LoraError(f"{where}: peft_type is {settings.get('peft_type')!r}, not 'LORA'")
        # PEFT's options that change what a LoRA layer computes, at their plain values; an
        # adapter that sets one otherwise would load here but compute something else.
        plain = {
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "use_dora": False,
            "lora_bias": False,
            "layers_to_transform": None,
            "layer_replication": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "trainable_token_indices": None,
            "target_parameters": None,
            "exclude_modules": None,
        }
        for key, value in plain.items():
            given = settings.get(key)
            if given is not None and given != value and not (value is None and not given):
                raise LoraError(f"{where}: {key} = {given!r} is not supported (only {value!r})")
        targets = settings.get("target_modules")
        if isinstance(targets, str):
            raise LoraError(f"{where}: target_modules as a pattern is not supported; list names")
        try:
            return cls(
                r=settings.get("r", 8),
                alpha=settings.get("lora_alpha", 8),
                dropout=settings.get("lora_dropout", 0.0),
                targets=tuple(targets or ()),
                rslora=bool(settings.get("use_rslora", False)),
            )
        except LoraError as err:
            raise LoraError(f"{where}: {err}") from None


class LoRALinear(nn.Module):
    """``base(x) + scaling · B(A(dropout(x)))``: `base` frozen (a plain or quantized linear
    layer), A and B trained. `merge` folds the update into a plain base's weight."""

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        in_features, out_features = base.in_features, base.out_features
        if config.r > min(in_features, out_features):
            raise LoraError(
                f"lora r = {config.r} exceeds the layer's width ({out_features} × {in_features}): "
                f"use r ≤ {min(in_features, out_features)}"
            )
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.config, self.r, self.scaling = config, config.r, config.scaling
        weight = next(base.parameters(), None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = weight.device if weight is not None else None
        self.lora_A = nn.Linear(in_features, config.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.merged = False
        if device != torch.device("meta"):
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation
            nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)

    def delta(self) -> torch.Tensor:
        """The update to the weight, scaling · B·A (out × in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.lora_B._forward_hooks or self.lora_B._forward_pre_hooks:
            # a hook on B (calibration) sees it run
            return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        # out += scaling · h Bᵀ: one product added in place into the base's fresh output, over
        # rows (tokens × features) so that no view of it is written (autograd would copy the
        # gradient back through the view). PEFT's way (B's output, then its scaled copy, then
        # the sum) makes two more tokens × out_features tensors in the forward pass and a
        # scaled gradient in the backward (a LoRA step of stories-8m peaks about 15% higher in
        # resident memory); out of place, addmm would still copy `out` whole first. No base
        # layer's backward needs its own output, and autograd refuses the step if one did.
        rows = x.reshape(-1, x.shape[-1])
        out = self.base_layer(rows)
        h = self.lora_A(self.dropout(rows))
        # under autocast the base's output and h are in the autocast dtype; B is cast to it,
        # as autocast casts a product's operands (an in-place product is not cast for us)
        out.addmm_(h, self.lora_B.weight.t().to(out.dtype), alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (a plain ``nn.Linear`` base only)."""
        if type(self.base_layer) is not nn.Linear:
            raise LoraError(
                f"cannot merge into a {type(self.base_layer).__name__}: only a plain linear "
                "layer's weight can take the update exactly"
            )
        if not self.merged:
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take a merged update out of the base weight again."""
        if self.merged:
            self.base_layer.weight -= self.delta().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora_(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap each linear layer named in ``config.targets`` in a `LoRALinear` and freeze every
    other parameter: only the updates train. Returns `model`, changed in place."""
    if lora_modules(model):
        raise LoraError("this model has LoRA layers already: merge them or load a fresh model")
    unknown = [t for t in config.targets if t not in LINEAR_TARGETS + MAMBA]
    if unknown:
        raise LoraError(
            f"lora targets {unknown} name no linear layer of a decoder block; choose among "
            f"{list(LINEAR_TARGETS + MAMBA)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    # A quantized base (QLoRA) is wrapped as a plain one is: the update learns on top of it.
    swap_linears(
        model,
        lambda name, layer: LoRALinear(layer, config),
        config.targets,
        kinds=(nn.Linear, QuantLinear),
    )
    return model


def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its layer and put the plain layer back: a model with no
    trace of LoRA, computing what the adapted one did (up to rounding)."""
    from ..models.swap import replace_module

    for name, layer in lora_modules(model).items():
        layer.merge()
        replace_module(model, name, layer.base_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------------
# Stored form: the base's tensors under their own names; the adapter under PEFT's.


def split_lora_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA model's state dict as (the base model's tensors, named as without LoRA; the
    adapter's, named as PEFT names them)."""
    base, adapter = {}, {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            adapter[_PEFT_PREFIX + name] = tensor
        else:
            base[name.replace(".base_layer.", ".")] = tensor
    return base, adapter


def join_lora_state(
    model: nn.Module, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """The inverse of `split_lora_state`, for `model`'s LoRA layers; an adapter tensor that
    `model` has no place for, or lacks, is an error naming `where`."""
    layers = lora_modules(model)
    state = dict(base)
    for name in layers:
        for key in [k for k in state if k.startswith(f"{name}.")]:
            state[key.replace(f"{name}.", f"{name}.base_layer.", 1)] = state.pop(key)
    expected = {
        f"{name}.{part}.weight": getattr(layer, part).weight.shape
        for name, layer in layers.items()
        for part in ("lora_A", "lora_B")
    }
    for key, tensor in adapter.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if name.endswith((".lora_A.default.weight", ".lora_B.default.weight")):
            name = name.replace(".default.weight", ".weight")
        if name not in expected:
            raise LoraError(f"{where}: tensor {key!r} adapts no layer of this model")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise LoraError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, this model's layer "
                f"needs {tuple(expected[name])}: the adapter was made for another base model"
            )
        state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LoraError(f"{where}: no tensor for {_PEFT_PREFIX}{missing[0]}")
    return state


def adapter_files(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """The adapter config and weights of directory `path`, or None where it has no adapter."""
    path = Path(path)
    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config.is_file():
        return None
    if not weights.is_file():
        raise LoraError(f"{path}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    return config, weights


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and tensors of an adapter directory (PEFT's format), read with
    safetensors."""
    files = adapter_files(path)
    if files is None:
        raise LoraError(f"{path}: no {ADAPTER_CONFIG}: not a LoRA adapter directory")
    config_file, weights_file = files
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(f"{config_file}: not valid JSON ({err})") from None
    config = LoraConfig.from_peft(settings, str(config_file))
    try:
        with safe_open(weights_file, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise LoraError(f"{weights_file}: unreadable safetensors file ({err})") from None
    return config, tensors


def load_adapter_(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter of directory `path` (slmlab's or PEFT's) on `model`, in place."""
    config, tensors = read_adapter(path)
    apply_lora_(model, config)
    where = str(Path(path) / ADAPTER_WEIGHTS)
    adapter = join_lora_state(model, {}, tensors, where)
    model.load_state_dict(adapter, strict=False)  # the adapter's tensors; every one was checked
    return model


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The `LoraConfig` of `model`'s LoRA layers (None without LoRA)."""
    return next((layer.config for layer in lora_modules(model).values()), None)


def adapter_bytes(
    adapter: dict[str, torch.Tensor], config: LoraConfig, base_model: str | None = None
) -> dict[str, bytes]:
    """The files (name → bytes) of an adapter in PEFT's format: `adapter` as
    `split_lora_state` names it, `base_model` the directory of the model it adapts."""
    from safetensors.torch import save

    return {
        ADAPTER_CONFIG: (json.dumps(config.to_peft(base_model), indent=2) + "\n").encode(),
        ADAPTER_WEIGHTS: save(
            {k: v.detach().contiguous() for k, v in adapter.items()}, metadata={"format": "pt"}
        ),
    }
