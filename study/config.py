"""Typed, validated configuration: the dataset block and one trial's configuration.

Every config is a frozen pydantic model with ``extra="forbid"``, so a typo in a YAML key is an error that
names the key instead of being silently ignored. YAML files are loaded with :func:`load_yaml_model`, which
turns pydantic's errors into one message naming the file, the key path and what is allowed.

The study's search-space spec (``study.spec``) embeds the same ``DatasetConfig`` and samples ``TrialConfig``
fields, so ``study train`` and ``study run`` read the dataset the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from study import registry
from study.config_errors import format_validation_error
from study.registry import CELLS, METHODS

SEED_MAX = 2**31 - 1  # torch, numpy and Optuna all take seeds this large; 2**70 overflowed each of them


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file, the key and what is allowed."""


def default_cache_dir() -> Path:
    """Where prepared datasets and feature caches live (``$CAPTION_STUDY_CACHE`` or ``~/.cache/caption-study``)."""
    env = os.environ.get("CAPTION_STUDY_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "caption-study"


class StrictModel(BaseModel):
    """Base for every config: frozen after loading, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_paths(info: ValidationInfo) -> bool:
    """Paths are checked unless the caller validates a config meant for another machine (a cluster spec)."""
    return not (info.context or {}).get("skip_path_checks", False)


def _known_encoder(name: str) -> str:
    if name not in registry.ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid encoders: {', '.join(sorted(registry.ENCODERS))}")
    return name


class ShapesDataset(StrictModel):
    """The embedded, generated dataset: rendered scenes of 1-3 shapes with 5 grammar captions each."""

    kind: Literal["shapes"] = "shapes"
    images: int = Field(1000, ge=30, description="total images; split 80/10/10 into train/val/test")
    seed: int = Field(0, ge=0, le=SEED_MAX,
                      description="generator seed: same seed and options give byte-identical files")
    image_size: int = Field(128, ge=32, le=512, description="rendered side in pixels (resized for the encoder)")
    encoder: str = Field("efficientnet_lite0", description="image encoder registry name")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where data and features are cached")

    _encoder = field_validator("encoder")(_known_encoder)


class KarpathyDataset(StrictModel):
    """Flickr8k / Flickr30k / MS-COCO in the Karpathy-split JSON format plus a folder of images."""

    kind: Literal["karpathy"] = "karpathy"
    json_path: Path = Field(alias="json", description="the dataset_*.json file")
    images_root: Path | None = Field(
        None, description="folder the filenames are relative to (default: <json folder>/images)"
    )
    restval: Literal["train", "keep", "drop"] = Field(
        "train", description="what to do with COCO's 'restval' split: fold into train, keep apart, or drop"
    )
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="a missing or corrupt image: stop with its name, or skip it and count it"
    )
    encoder: str = Field("efficientnet_lite0", description="image encoder registry name")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where features are cached")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    _encoder = field_validator("encoder")(_known_encoder)

    @field_validator("json_path")
    @classmethod
    def _json_exists(cls, path: Path, info: ValidationInfo) -> Path:
        path = path.expanduser().resolve()
        if _check_paths(info) and not path.is_file():
            raise ValueError(f"dataset JSON {path} does not exist")
        return path

    @model_validator(mode="after")
    def _root_exists(self, info: ValidationInfo) -> "KarpathyDataset":
        root = self.resolved_images_root
        if _check_paths(info) and not root.is_dir():
            raise ValueError(f"images_root {root} is not a folder")
        return self

    @property
    def resolved_images_root(self) -> Path:
        root = self.images_root if self.images_root is not None else self.json_path.parent / "images"
        return root.expanduser().resolve()


DatasetConfig = Annotated[Union[ShapesDataset, KarpathyDataset], Field(discriminator="kind")]


class TrialConfig(StrictModel):
    """One trial: the model, its tokens, the optimiser and the dataset. Defaults are sensible on ``shapes``.

    Scientific parameters (what the study asks about): ``inject``, ``cell``, ``tokens``, ``layers``.
    Nuisance parameters (tuned for fairness): ``hidden``, ``embed``, ``dropout``, ``lr``, ``weight_decay``...
    A method's own fields (``seed_h`` of init; ``attention_dim``, ``attention_init``, ``attention_penalty`` of
    attention) are ignored by the other methods: a spec searches them with ``when: {inject: ...}``.
    """

    dataset: DatasetConfig = Field(default_factory=ShapesDataset)

    # --- model ---------------------------------------------------------------------------------------
    inject: str = Field("init", description="init | pre | par | merge | attention | none")
    cell: str = Field("lstm", description="lstm (fused) | gru (fused) | lstm_peephole (seed eq. 1-5)")
    layers: int = Field(1, ge=1, le=4, description="stacked recurrent layers")
    hidden: int = Field(256, ge=8, le=4096, description="recurrent width")
    embed: int = Field(128, ge=8, le=4096, description="token embedding size")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout on embeddings, between layers and outputs")
    seed_h: bool = Field(False, description="init only: also seed h0 of the first layer (c0 is always seeded)")
    attention_dim: int = Field(256, ge=8, le=4096, description="attention only: size of the attention MLP")
    attention_init: bool = Field(
        False, description="attention only: start from Xu et al.'s state instead of zeros: every layer's h0, "
        "and c0 for LSTM cells (a GRU has no c), is tanh of a learned linear map of the mean annotation vector")
    attention_penalty: float = Field(
        0.0, ge=0.0, description="attention only: lambda of Xu et al.'s doubly stochastic penalty: each caption's "
        "NLL gets lambda * sum_g (1 - sum_t alpha_tg)^2 over its real (non-PAD) steps, and the batch's sum is "
        "divided by its tokens like the NLL (0: off; the reported train and validation losses stay the plain NLL)")
    normalize_features: bool = Field(
        True, description="z-score image features per channel with the train split's mean/std (every method)")

    # --- tokens --------------------------------------------------------------------------------------
    tokens: Literal["word", "char"] = Field("word", description="word- or character-level captions")
    min_count: int = Field(2, ge=1, description="word tokens: minimum train-split count to enter the vocabulary")
    max_len: int | None = Field(None, ge=4, description="max tokens per caption (default: word 20, char 100)")

    # --- optimisation --------------------------------------------------------------------------------
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(2e-3, gt=0.0, lt=1.0)
    # At most 1: a larger decay pulls every weight to zero faster than any gradient moves it (1e30 under Adam
    # left the loss flat at log(vocabulary) without a NaN; issue 33, item 5).
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    clip: float = Field(5.0, gt=0.0, description="gradient-norm clipping")
    schedule: Literal["constant", "cosine", "step"] = Field("cosine", description="LR schedule over epochs")
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(10, ge=1, le=1000)
    seed: int = Field(0, ge=0, le=SEED_MAX - 1000, description="model and batch-order seed (confirm runs add 1000+k)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast around the forward pass (weights, optimiser and loss stay fp32); "
        "auto: bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32 (study.trial.precision)")

    # --- evaluation ----------------------------------------------------------------------------------
    beam_size: int = Field(3, ge=1, le=20, description="beam width for final test captions")
    length_penalty: float = Field(0.7, ge=0.0, description="beam score / length**length_penalty")
    val_images: int | None = Field(None, ge=1, description="cap on val images decoded per epoch (None: all)")
    val_beam_size: int = Field(1, ge=1, le=20, description="beam width of the per-epoch validation captions (1: "
                               "greedy); the test's beam_size makes the validation score the one the test reads")
    select_metric: Literal["val_CIDEr-D", "val_BLEU-4", "val_loss", "val_bpc"] | None = Field(
        None, description="which epoch's model the run ends with: the one with the best value of this validation "
        "metric (kept as it is reached), or the last epoch's (None)")
    val_captions: int | None = Field(
        None, ge=1, description="cap on val captions in the per-epoch val loss and bits per character: the "
        "first ones, in image order, so 5 x val_images covers the decoded images' captions (None: all)")

    @field_validator("inject", "cell")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        # The names come from the leaf registry, so validating a config imports neither torch nor the models.
        registry = METHODS if info.field_name == "inject" else CELLS
        if name not in registry:
            raise ValueError(f"unknown {info.field_name} {name!r}; valid: {', '.join(sorted(registry))}")
        return name

    @property
    def effective_max_len(self) -> int:
        if self.max_len is not None:
            return self.max_len
        return 20 if self.tokens == "word" else 100

    @property
    def run_name(self) -> str:
        """A readable name such as ``init-lstm-2x512-word``."""
        return f"{self.inject}-{self.cell}-{self.layers}x{self.hidden}-{self.tokens}"


M = TypeVar("M", bound=BaseModel)


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a
    second ``search:`` block replaced the first (a study ran 40 trials instead of 2; issue 33, item 6)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that the mapping's own keys may override
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice, on line {seen[key]} and on line {line}; "
                                    "keep one")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        # A binary file passed by mistake (a checkpoint, an image): say so instead of a codec traceback.
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8 text)") from None
    except yaml.YAMLError as exc:  # its marks name the text "<unicode string>": name the file instead
        raise ConfigError(f"{path}: not valid YAML: " + str(exc).replace('"<unicode string>"', f'"{path}"')) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def validate_model(model: type[M], data: dict[str, Any], source: str, *, check_paths: bool = True) -> M:
    """``model.model_validate(data)`` with a ``ConfigError`` naming ``source`` and each bad key.

    ``check_paths=False`` skips the existence checks of dataset files (for specs meant for a cluster)."""
    try:
        return model.model_validate(data, context={"skip_path_checks": not check_paths})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from None


def load_yaml_model(model: type[M], path: Path) -> M:
    """Load and validate a YAML file into ``model``."""
    return validate_model(model, read_yaml(path), str(path))


def load_trial_config(path: Path, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """Load a trial YAML (``study train CONFIG.yaml``); ``overrides`` replace top-level keys."""
    data = read_yaml(path)
    data.update(overrides or {})
    return validate_model(TrialConfig, data, str(path))


def checkpoint_config(data: dict[str, Any], source: str) -> TrialConfig:
    """The trial config stored in a checkpoint, without checking its dataset paths: a trained model must
    caption on a machine where its training data is not (moved, deleted or never copied there). A checkpoint
    from before the ``precision`` setting was trained in fp32 (on the CPU) and decodes so."""
    return validate_model(TrialConfig, {"precision": "fp32", **data}, source, check_paths=False)
