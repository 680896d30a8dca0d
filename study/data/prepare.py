"""Prepare a dataset once: read it, extract (or reuse) its image features, tokenise its captions.

The result, :class:`PreparedData`, holds only numpy arrays and small Python objects, so the driver can put
it into Ray's object store once and every trial on a node maps the same copy (numpy arrays are zero-copy
there; torch tensors would be copied per trial). Trials turn batches into tensors as they go.

Data flow: config -> (shapes generator) -> Karpathy JSON -> CaptionDataset -> FeatureCache (pooled + grid)
-> per token setting: Vocab + padded caption ids per split.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from study.config import ConfigError, KarpathyDataset, ShapesDataset, TrialConfig
from study.data.features import extract_features
from study.data.karpathy import CaptionDataset, load_karpathy
from study.data.shapes import ensure_shapes
from study.data.tokens import SPECIALS, Vocab, word_tokens
from study.registry import any_needs_grid

if TYPE_CHECKING:
    from study.spec import StudySpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TokenSetting:
    """What determines a tokenisation: the vocabulary kind, the length cap and the word count threshold."""

    kind: str
    max_len: int
    min_count: int

    @classmethod
    def of(cls, cfg: TrialConfig) -> "TokenSetting":
        min_count = cfg.min_count if cfg.tokens == "word" else 1
        return cls(cfg.tokens, cfg.effective_max_len, min_count)


@dataclass
class SplitCaptions:
    """Tokenised captions of one split. Rows of ``ids`` are captions; ``image`` maps them to split images."""

    ids: np.ndarray  # (N_cap, max_len + 2) int64: START, tokens..., END, PAD...
    lengths: np.ndarray  # (N_cap,) int64, including START and END
    image: np.ndarray  # (N_cap,) int64: position of the caption's image within the split
    truncated: int  # captions cut at max_len


@dataclass
class TokenSet:
    vocab: Vocab
    splits: dict[str, SplitCaptions]


@dataclass
class SplitImages:
    rows: np.ndarray  # (N_img,) int64: rows of the feature arrays
    references: list[list[str]]  # raw reference captions per image
    paths: list[Path]


@dataclass
class PreparedData:
    """Everything a trial needs, as numpy arrays (shareable through Ray's object store)."""

    name: str
    pooled: np.ndarray  # (N, F) float16, every image of every split
    grid: np.ndarray | None  # (N, G, F) float16 spatial features, or None when no trial attends
    images: dict[str, SplitImages]
    token_sets: dict[TokenSetting, TokenSet] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    # Per-channel mean/std of the train split's features, (F,) float32 each: "pooled_mean", "pooled_std" and,
    # with a grid, "grid_mean", "grid_std". The captioner z-scores its inputs with them (see models.captioner).
    feature_stats: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.pooled.shape[1])

    def tokens_for(self, cfg: TrialConfig) -> TokenSet:
        setting = TokenSetting.of(cfg)
        if setting not in self.token_sets:
            known = ", ".join(str(s) for s in self.token_sets) or "none"
            raise KeyError(f"captions were not prepared for {setting}; prepared: {known}")
        return self.token_sets[setting]


def dataset_json_for(dataset: ShapesDataset | KarpathyDataset, progress: bool = True) -> tuple[Path, Path]:
    """The (dataset JSON, images root) of a dataset config, generating ``shapes`` on first use."""
    if isinstance(dataset, ShapesDataset):
        json_path = ensure_shapes(dataset, progress=progress)
        return json_path, json_path.parent
    return dataset.json_path, dataset.resolved_images_root


def load_dataset(dataset: ShapesDataset | KarpathyDataset, progress: bool = True) -> CaptionDataset:
    json_path, root = dataset_json_for(dataset, progress=progress)
    if isinstance(dataset, ShapesDataset):
        return load_karpathy(json_path, root)
    return load_karpathy(json_path, root, restval=dataset.restval, on_error=dataset.on_bad_image)


def tokenize_splits(
    setting: TokenSetting, images: dict[str, SplitImages], vocab: Vocab | None = None
) -> TokenSet:
    """Build the vocabulary from the train split only, then encode every split's captions."""
    if vocab is None:
        train_captions = [c for refs in images["train"].references for c in refs]
        vocab = Vocab.build(setting.kind, train_captions, min_count=setting.min_count)
        if len(vocab) == len(SPECIALS):
            # Every caption would be <unk>s: training "succeeds" and every score is 0.
            top = max(Counter(t for c in train_captions for t in word_tokens(c)).values(), default=0)
            raise ConfigError(f"min_count {setting.min_count}: no word of the train split occurs that often, so "
                              f"the vocabulary would hold only {SPECIALS}; the most frequent word occurs {top} "
                              f"times: use min_count {top} or less")
    splits: dict[str, SplitCaptions] = {}
    for name, split in images.items():
        texts = [c for refs in split.references for c in refs]
        owner = np.repeat(np.arange(len(split.references)), [len(r) for r in split.references])
        ids, lengths, truncated = vocab.encode_batch(texts, setting.max_len)
        splits[name] = SplitCaptions(ids.numpy(), lengths.numpy(), owner.astype(np.int64), truncated)
        if truncated:
            log.info("%s/%s: %d of %d captions truncated at %d tokens", setting.kind, name, truncated,
                     len(texts), setting.max_len)
    return TokenSet(vocab, splits)


def feature_items(data: CaptionDataset) -> list[tuple[str, Path]]:
    """(cache key, image path) per record: the path relative to the images root where it lies below it.
    ``study features`` and ``prepare`` must agree on these keys to share a feature cache."""
    return [(str(r.path.relative_to(data.images_root)) if r.path.is_relative_to(data.images_root)
             else str(r.path), r.path) for r in data.records]


def prepare(dataset: ShapesDataset | KarpathyDataset, settings: list[TokenSetting], *, need_grid: bool = True,
            progress: bool = True, device: str | None = None) -> PreparedData:
    """Read the dataset, extract or reuse features, and tokenise captions for each token setting."""
    data = load_dataset(dataset, progress=progress)
    items = feature_items(data)
    fingerprint = data.fingerprint()  # stats every image file: compute once
    cache = extract_features(items, encoder=dataset.encoder, cache_dir=dataset.cache_dir,
                             fingerprint=fingerprint, progress=progress, device=device,
                             on_error=getattr(dataset, "on_bad_image", "error"))
    failed = set(cache.failed)

    images: dict[str, SplitImages] = {}
    for split in SPLITS:
        rows, refs, paths = [], [], []
        for row, (record, (key, _)) in enumerate(zip(data.records, items)):
            if record.split == split and key not in failed:
                rows.append(row)
                refs.append(list(record.captions))
                paths.append(record.path)
        if not rows:
            raise ValueError(f"{data.json_path}: the {split!r} split has no usable images")
        images[split] = SplitImages(np.asarray(rows, dtype=np.int64), refs, paths)

    # Still views of the on-disk memmaps: `ray.put` (through tune.with_parameters) copies them into the
    # object store once per node, and every trial maps that copy.
    pooled = np.asarray(cache.pooled)
    grid = np.asarray(cache.grid) if need_grid else None
    prepared = PreparedData(name=data.name, pooled=pooled, grid=grid, images=images, info={
        "dataset": data.name, "dataset_json": str(data.json_path), "dataset_fingerprint": fingerprint,
        "encoder": dataset.encoder, "feature_cache": str(cache.path), "feature_cache_reused": cache.reused,
        "images_skipped": len(data.skipped) + len(failed)})
    prepared.feature_stats = feature_stats(pooled, grid, images["train"].rows)
    for setting in dict.fromkeys(settings):
        prepared.token_sets[setting] = tokenize_splits(setting, images)
    return prepared


def feature_stats(pooled: np.ndarray, grid: np.ndarray | None, train_rows: np.ndarray,
                  grid_sample: int = 512) -> dict[str, np.ndarray]:
    """Per-channel mean and std of the train split's features (float32, (F,) each).

    Raw EfficientNet features are small and uncentred (per-channel std ~0.36 on Flickr8k) while word
    embeddings start at N(0, 1): an image entering as an input step (``pre``) varied the state across images
    about a third as much as a word varies it across the vocabulary, and pre learned to ignore it (see
    tests/test_pre_injection.py). Every method gets the same z-scored features. The grid's statistics come from an
    evenly spaced sample of train
    images (all 49 positions each): its per-channel spread is about twice the pooled vector's.
    A std is floored at 0.01 so a channel that is constant in train (generated scenes) cannot blow up.
    """
    train = pooled[train_rows].astype(np.float32)  # (N_train, F)
    stats = {"pooled_mean": train.mean(0), "pooled_std": np.maximum(train.std(0), 1e-2)}
    if grid is not None:
        pick = train_rows[np.linspace(0, len(train_rows) - 1, min(grid_sample, len(train_rows))).astype(int)]
        cells = grid[np.unique(pick)].astype(np.float32).reshape(-1, grid.shape[2])  # (n*G, F)
        stats.update(grid_mean=cells.mean(0), grid_std=np.maximum(cells.std(0), 1e-2))
    return stats


def token_settings(spec: "StudySpec") -> list[TokenSetting]:
    """Every tokenisation a trial of this spec may ask for (prepared once in the driver)."""
    def values(name: str) -> list[Any]:
        if name in spec.space and spec.space[name].choice is not None:
            return list(spec.space[name].choice)
        if name in spec.space:
            raise ValueError(f"space.{name} must be a choice: captions are tokenised once per value")
        return [spec.fixed.get(name, TrialConfig.model_fields[name].default)]

    settings = []
    for tokens in values("tokens"):
        for max_len in values("max_len"):
            for min_count in values("min_count"):
                cfg = TrialConfig.model_validate({"tokens": tokens, "max_len": max_len, "min_count": min_count})
                settings.append(TokenSetting.of(cfg))
    return list(dict.fromkeys(settings))


def prepare_for_spec(spec: "StudySpec", *, progress: bool = True) -> PreparedData:
    """The data every trial of a study reads: its dataset's features (the grid only when a method of the study
    reads it, as the registry says) and its captions tokenised every way the space asks for."""
    need_grid = any_needs_grid([*spec.injects, spec.fixed.get("inject")])
    return prepare(spec.dataset, token_settings(spec), need_grid=need_grid, progress=progress)
