"""Recipes: frozen dataclasses per section, loaded from YAML, with typed `section.key=value` overrides.

Unknown keys are errors that list the valid keys of that section (FFCV's config silently accepted
misspelt keys; a typo in `optim.lr` must never train with the default instead).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastssl.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    backend: str = "torch"  # torch | dali | ffcv
    path: str = ""  # ImageFolder root (torch, dali), shard dir (dali) or .beton file (ffcv)
    device: str = "auto"  # where views are made: auto | cpu | cuda (DALI's CPU mode is `cpu`)
    image_size: int = 224
    batch_size: int = 256  # global batch over all processes
    workers: int = 4  # decode workers per process
    augment: str = "simclr"  # preset in pipelines/augment.py
    crop_scale: tuple[float, float] | None = None  # overrides the preset's crop area range for every view
    drop_last: bool = True
    # torch and ffcv backends: torch.compile the augmentation after the crop (pipelines/ops.py). auto: where
    # views are made on CUDA (on a CPU the eager path computes only the samples an op applies to, as fast)
    compile: str = "auto"  # auto | true | false
    # DALI memory knobs (see pipelines/dali.py for what each costs)
    dali_prefetch_queue_depth: int = 2
    dali_hw_decoder_load: float = 0.65
    # FFCV
    # shared = base.epoch_order, the batches every backend reads; random | quasi_random | sequential are ffcv's
    # (quasi_random reads a few pages at a time: for datasets larger than RAM, with ffcv_os_cache=false)
    ffcv_order: str = "shared"
    ffcv_os_cache: bool = True
    ffcv_decode: str = "once"  # once (both views cut on the device from one decode) | per_view (decode twice)


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "resnet50"
    small_input: bool = False  # CIFAR-style ResNet stem (3x3 stride-1 conv, no max-pool) for <=64 px images
    zero_init_residual: bool = True  # ResNets: last BN of each block at gamma 0 (false: MoCo v1/v2's torchvision)
    channels_last: bool = True
    compile: str = "auto"  # auto (on CUDA) | true | false
    # ViT options (fastssl/encoders/vit.py); setting one on a ResNet is an error at config time.
    patch_size: int = 0  # 0: the encoder's own (16 for vit_tiny/small/base)
    pos_embed: str = "learned"  # learned | sincos (fixed 2-D sin-cos, MoCo v3 sec. 5)
    frozen_patch_embed: bool = False  # random patch projection, never trained (MoCo v3 sec. 5)
    stem: str = "patch"  # patch | conv (Xiao et al. 2021, ViT_C: conv stem, one block fewer)
    spt_lsa: bool = False  # shifted patch tokens + locality self-attention (Lee et al. 2021)
    drop_path: float = 0.0  # stochastic depth rate of the ViT blocks (timm: rising linearly to it over depth)
    init: str = "timm"  # timm (trunc-normal 0.02) | moco (MoCo v3 vits.py: xavier Linears, qkv per q/k/v)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "simclr"
    temperature: float = 0.1
    loss_impl: str = "auto"  # auto | naive | chunked | triton
    proj_layers: int = 3
    proj_hidden: int = 2048
    proj_dim: int = 128
    proj_last_bn: bool = True
    proj_hidden_bn: bool = True  # BN after each hidden Linear; MoCo v2's head has none (Linear+bias, ReLU)
    # SimCLR: the loss is loss_scale x NT-Xent's mean over the 2N views (the paper's eq. 1); 2 = the released
    # code's objective (the sum of its two directions' means), which its lr and weight decay were tuned with
    loss_scale: float = 1.0
    # MoCo (fastssl/methods/mocov2.py, mocov3.py)
    momentum: float = 0.99  # key-encoder EMA; v2 keeps it fixed, v3 raises it to 1 on a cosine
    queue_size: int = 65536  # MoCo v2's negatives; a multiple of data.batch_size (MoCo v3 has no queue)
    shuffle_bn_splits: int = 8  # key-encoder BN groups over the global batch (MoCo: 8 GPUs)
    pred_layers: int = 0  # MoCo v3's predictor (2); 0 = none
    pred_hidden: int = 4096
    pred_last_bn: bool = False  # MoCo v3: the ViT predictor ends in BN (no affine), the ResNet one does not
    # dense relative localisation (fastssl/methods/drloc.py), auxiliary loss for ViTs; 0 = off
    drloc_weight: float = 0.0
    drloc_pairs: int = 64  # sampled token pairs per image


@dataclass(frozen=True)
class OptimConfig:
    name: str = "lars"  # lars | adamw | lamb
    lr: float = 0.3  # base learning rate for a batch of 256; scaled by lr_scaling
    lr_scaling: str = "linear"  # linear (lr x batch/256) | sqrt (lr x sqrt(batch/256); SimCLR's 0.075 -> 1.2) | none
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    trust_coefficient: float = 0.001  # LARS eta
    warmup_epochs: float = 10.0
    min_lr: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0  # >0 caps the run (the schedule is built for this many steps)
    stop_after_steps: int = 0  # >0 stops early as if preempted, after checkpointing; resume continues
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | bf16 | fp16 | fp32
    grad_accum: int = 1
    allow_grad_accum: bool = False  # accumulation changes the negatives of contrastive losses
    progress: bool = True  # per-step status; the start-up summary and warnings print either way


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 20
    knn_t: float = 0.07
    knn_train_path: str = ""  # defaults to data.path when that is an ImageFolder
    knn_val_path: str = ""  # empty: no kNN evaluation
    knn_random_baseline: bool = True
    batch_size: int = 256
    # Online kNN monitor (fastssl/eval/monitor.py): every N epochs on fixed subsets of the kNN folders.
    knn_every_epochs: int = 0  # 0: off
    knn_monitor_train_samples: int = 2000  # memory bank size (a class-balanced subset of the kNN train folder)
    knn_monitor_val_samples: int = 500  # queries (a class-balanced subset of eval.knn_val_path)
    # Linear probe (fastssl/eval/linear.py) on cached centre-crop features.
    linear_epochs: int = 100
    linear_lr: float = 0.1  # x batch/256; BN without affine in front makes one lr fit every encoder
    linear_optimizer: str = "sgd"  # sgd | lars
    linear_weight_decay: float = 0.0


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    resume: str = ""  # a run directory to continue
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CONFIG_TYPES = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {name: tp for name, tp in _CONFIG_TYPES.items() if dataclasses.is_dataclass(tp)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads `false` as a bool: string fields like compile=auto|true|false
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {_type_name(tp)} at {where}")


def _build_section(cls: type, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown key {where + '.' if where else ''}{key}; valid keys"
                            f"{' in ' + where if where else ''}: {', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> Config:
    d = dict(d or {})
    valid = list(_CONFIG_TYPES)
    for key in d:
        if key not in _CONFIG_TYPES:
            raise UserError(f"unknown top-level key {key}; valid keys: {', '.join(valid)}")
    kwargs = {}
    for name, tp in _CONFIG_TYPES.items():
        if name in d:
            kwargs[name] = (_build_section(tp, d[name] or {}, name) if name in SECTIONS
                            else _coerce(d[name], tp, name))
    return Config(**kwargs)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = {k: plain(x) for k, x in dataclasses.asdict(v).items()} if f.name in SECTIONS else v
    return out


def _field_type(path: list[str]) -> Any:
    """The declared type of the key an override names, or None for a key that does not exist."""
    if len(path) == 1:
        return _CONFIG_TYPES.get(path[0])
    if len(path) == 2 and path[0] in SECTIONS:
        return typing.get_type_hints(SECTIONS[path[0]]).get(path[1])
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if _field_type(path) is str:
        # Taken as typed: YAML 1.1 would turn output_dir=12:30 into 750 (base 60), data.path=0777 into 511
        # (octal), on into true, and 2024-01-01 into a date, so a run would use a folder nobody named.
        return path, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (d or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            d[path[0]] = value
        elif len(path) == 2:
            if path[0] not in SECTIONS:
                raise UserError(f"unknown section {path[0]!r} in override {text!r}; valid sections: "
                                f"{', '.join(SECTIONS)}")
            d.setdefault(path[0], {})
            if d[path[0]] is None:
                d[path[0]] = {}
            d[path[0]][path[1]] = value
        else:
            raise UserError(f"override {text!r} is not of the form section.key=value")
    return d


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"recipe {str(p)!r} is a directory; expected a YAML file (see recipes/)")
    if not p.is_file():
        raise UserError(f"recipe file {str(p)!r} does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"recipe {str(p)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at position "
                        f"{e.start}); expected a YAML file") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"recipe {str(p)!r} must be a mapping of sections, got {type(d).__name__}")
    return d


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    base = load_yaml(path) if path else {}
    return config_from_dict(apply_overrides(base, list(overrides)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
