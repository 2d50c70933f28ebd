"""Training of the heads on cached frozen-backbone features, with validation-based model selection."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ModelConfig
from .data import DatasetError, ImageRecord, load_dataset, select_split
from .evaluation import evaluate_scores
from .factory import create_model, load_model, save_model
from .features import CachedFeatures, LiveImageFeatures, LiveTextFeatures, image_features, mosaic_features, text_features
from .losses import LOSSES
from .model import AlignModel, EncoderOutput, resolve_device
from .precomputed import FeatureFolder, PrecomputedFeatures, check_input
from .mosaic import MOSAIC_TILES, Mosaic, content_token_mask, plan_mosaics, tile_cells, tile_grounding_loss, tile_pointing
from . import alignment

log = logging.getLogger(__name__)

WEIGHT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


@dataclass
class TrainOptions:
    dataset: Path
    images: Path | None  # None: the image side is read from ``features``
    out: Path
    epochs: int = 12
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    prior_lr: float | None = None  # the class prior's scalars (weights, gate slopes); None: ``lr``
    loss: str = "triplet"
    margin: float = 0.2
    temperature: float = 0.05
    global_loss_weight: float = 1.0
    val_size: int = 100
    seed: int = 0
    candidates: int = 20
    cache_dir: Path | None = None
    device: str = "auto"
    workers: int = 4
    resume: bool = False
    tune_local_weight: bool = True
    augment_views: int = 4
    mosaic_loss_weight: float = 0.0
    mosaics: int = 1500
    mosaic_temperature: float = 0.05
    progress: bool = True
    features: Path | None = None  # precomputed region features (models.precomputed) instead of photos


@dataclass
class Pairs:
    """Image feature rows and, per caption, its text feature row and its image's position in the split."""

    image_rows: torch.Tensor
    caption_rows: list[list[int]] = field(default_factory=list)

    @property
    def text_to_image(self) -> torch.Tensor:
        return torch.tensor([i for i, rows in enumerate(self.caption_rows) for _ in rows])

    @property
    def text_rows(self) -> torch.Tensor:
        return torch.tensor([r for rows in self.caption_rows for r in rows])


def _pairs(records: list[ImageRecord], row_of: dict[str, int], ok: torch.Tensor, text_offsets: dict[str, int]) -> Pairs:
    kept = [r for r in records if ok[row_of[r.filename]]]
    return Pairs(
        torch.tensor([row_of[r.filename] for r in kept], dtype=torch.long),
        [list(range(text_offsets[r.filename], text_offsets[r.filename] + len(r.captions))) for r in kept],
    )


def encode_cached(model: AlignModel, feats: CachedFeatures | LiveImageFeatures | LiveTextFeatures, rows: torch.Tensor, image: bool, batch: int = 256) -> EncoderOutput:
    """Run the heads (eval mode) over cached backbone features."""
    model.eval()
    head = model.image_head_forward if image else model.text_head_forward
    with torch.inference_mode():
        parts = [head(feats.batch(rows[i : i + batch], model.device)) for i in range(0, len(rows), batch)]
    return EncoderOutput.concat(parts).cpu()


def validation_scores(model: AlignModel, img, txt, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts x images global and local scores on the validation pairs."""
    images = encode_cached(model, img, pairs.image_rows, image=True)
    texts = encode_cached(model, txt, pairs.text_rows, image=False)
    global_scores = texts.global_emb @ images.global_emb.T
    return global_scores, model.local_scores(texts, images)


def _checkpoint_paths(out: Path) -> tuple[Path, Path]:
    return out / "checkpoint" / "state.safetensors", out / "checkpoint" / "state.json"


def _save_checkpoint(out: Path, model: AlignModel, opt: torch.optim.Optimizer, meta: dict) -> None:
    tensors_path, meta_path = _checkpoint_paths(out)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    opt_state = opt.state_dict()
    for pid, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = dict(meta, param_groups=opt_state["param_groups"])
    tmp_tensors, tmp_meta = tensors_path.with_name("state.safetensors.tmp"), meta_path.with_name("state.json.tmp")
    save_file(tensors, str(tmp_tensors))
    tmp_meta.write_text(json.dumps(meta))
    tmp_tensors.replace(tensors_path)  # weights first: a crash in between leaves the older meta, still valid
    tmp_meta.replace(meta_path)


def _load_checkpoint(out: Path, model: AlignModel, opt: torch.optim.Optimizer) -> dict | None:
    tensors_path, meta_path = _checkpoint_paths(out)
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(tensors_path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    if "rng.torch" in tensors:  # dropout draws from it: restored, a resumed run ends with the same weights
        torch.set_rng_state(tensors["rng.torch"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value.to(model.device) if name != "step" else value
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


class CheckpointError(ValueError):
    """A checkpoint in the output folder that this run may not silently reuse or overwrite."""


# Options that do not change what a run computes: a run may be resumed with other values of these.
RESUMABLE_CHANGES = ("resume", "progress", "device", "workers", "cache_dir", "epochs")


def run_identity(options: TrainOptions, config: ModelConfig) -> dict:
    """What a checkpoint must match to be resumed: the model's config and the options that shape training.
    ``epochs`` may grow (the schedule is then that of the longer run from the resumed epoch on)."""
    opts = {k: str(v) for k, v in asdict(options).items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps({"config": config.to_dict(), "options": opts}))


def _has_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def tune_local_weight(global_scores: torch.Tensor, local: torch.Tensor, text_to_image: torch.Tensor,
                      candidates: int, grid=WEIGHT_GRID) -> tuple[float, dict[float, float]]:
    """Pick the TGDT weight ``w`` that maximises two-stage rsum on validation scores."""
    results = {}
    for w in grid:
        fused = alignment.fuse(global_scores, local, w)
        results[w] = evaluate_scores(global_scores, fused, text_to_image, candidates)["two-stage"]["rsum"]
    best = max(results, key=lambda w: (results[w], -w))
    return best, results


ImageSource = CachedFeatures | LiveImageFeatures | PrecomputedFeatures
TextSource = CachedFeatures | LiveTextFeatures


def parameter_groups(model: torch.nn.Module, options: TrainOptions) -> list[dict[str, Any]]:
    """AdamW groups: the class prior's scalars at ``prior_lr`` without weight decay (when set), the rest at
    ``lr``; each group keeps its peak rate as ``peak_lr`` for the schedule."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if options.prior_lr is None:
        return [{"params": [p for _, p in trainable], "peak_lr": options.lr}]
    prior = [p for n, p in trainable if n.startswith("class_prior.")]
    rest = [p for n, p in trainable if not n.startswith("class_prior.")]
    groups = [{"params": rest, "peak_lr": options.lr}]
    if prior:
        groups.append({"params": prior, "peak_lr": options.prior_lr, "lr": options.prior_lr, "weight_decay": 0.0})
    return groups


@dataclass
class TrainRun:
    """Everything a prepared training run needs between epochs: model, features, pairs, optimiser, history."""

    options: TrainOptions
    model: AlignModel
    device: torch.device
    images: ImageSource
    views: list[ImageSource]
    texts: TextSource
    failures: list[tuple[str, str]]
    train_pairs: Pairs
    val_pairs: Pairs
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    loss_fn: Callable[..., torch.Tensor]
    loss_kwargs: dict[str, float]
    mosaic: "MosaicTask | None" = None
    identity: dict = field(default_factory=dict)
    start_epoch: int = 0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def out_model(self) -> Path:
        return self.options.out / "model"


def _image_sources(model: AlignModel, filenames: list[str], options: TrainOptions) -> tuple[list[ImageSource], list[tuple[str, str]]]:
    """The plain view then ``options.augment_views`` augmented views, with the images that failed to decode.

    With a trainable image backbone every view is computed live: cached views would hold the features of the
    backbone as it was before training. Precomputed region features are one view, read from their folder."""
    check_input(model, options.features)
    if options.features is not None:
        if options.mosaic_loss_weight > 0:
            raise ValueError("--mosaic-loss needs an image backbone whose regions are grid cells, not precomputed "
                             "region features")
        source = PrecomputedFeatures(model, FeatureFolder(options.features), filenames)
        return [source], source.failures
    paths = [options.images / f for f in filenames]
    if _has_trainable(model.image_backbone):
        live = LiveImageFeatures(model, paths)
        return [live, *(LiveImageFeatures(model, paths, view=v) for v in range(1, options.augment_views + 1))], live.failures
    plain, failures = image_features(model, paths, options.cache_dir, workers=options.workers)
    views = [image_features(model, paths, options.cache_dir, workers=options.workers, view=v)[0]
             for v in range(1, options.augment_views + 1)]
    return [plain, *views], failures


@dataclass
class MosaicTask:
    """Mosaic grounding (:mod:`models.mosaic`): mosaics of training photos for the loss, of validation photos for
    the measure; items are positions in the split's :class:`Pairs`."""

    train: CachedFeatures
    train_plan: list[Mosaic]
    val: CachedFeatures | None
    val_plan: list[Mosaic]
    inside: torch.Tensor  # tiles x cells
    content: torch.Tensor  # text feature rows x tokens: the content-word positions of every caption


def _mosaic_task(model: AlignModel, options: TrainOptions, paths: list[Path], train_pairs: Pairs, val_pairs: Pairs,
                 captions: list[str]) -> MosaicTask:
    grid = model.region_grid()
    if grid is None or not model.takes_images:
        raise ValueError("the mosaic loss needs an image backbone whose regions are grid cells")

    def build(pairs: Pairs, count: int, seed: int) -> tuple[CachedFeatures, list[Mosaic]]:
        plan = plan_mosaics(len(pairs.image_rows), count, seed)
        split_paths = [paths[int(r)] for r in pairs.image_rows]
        return mosaic_features(model, split_paths, plan, options.cache_dir), plan

    if len(train_pairs.image_rows) < len(MOSAIC_TILES):
        raise ValueError(f"the mosaic loss needs at least {len(MOSAIC_TILES)} training images")
    train, train_plan = build(train_pairs, options.mosaics, options.seed)
    val, val_plan = None, []  # too few validation photos for a mosaic: no measure
    if len(val_pairs.image_rows) >= len(MOSAIC_TILES):
        val, val_plan = build(val_pairs, len(val_pairs.image_rows), options.seed + 1)
    return MosaicTask(train, train_plan, val, val_plan, tile_cells(grid), _content(model, captions))


def _content(model: AlignModel, texts: list[str]) -> torch.Tensor:
    """Texts x tokens content-word mask on the text features' token axis (tokenized once, before training)."""
    tok = model.tokenize(texts)
    return content_token_mask(tok.words, tok.attention_mask.bool() & ~tok.special_mask)


def _mosaic_batch(run: TrainRun, feats: CachedFeatures, mosaic_rows: torch.Tensor, tiles: torch.Tensor,
                  caption_rows: torch.Tensor) -> tuple[EncoderOutput, EncoderOutput, torch.Tensor, torch.Tensor]:
    """Encoded mosaics and captions, the captions' content masks and their tiles' cells."""
    model, task = run.model, run.mosaic
    img = model.image_head_forward(feats.batch(mosaic_rows, run.device))
    txt = model.text_head_forward(run.texts.batch(caption_rows, run.device))
    content = task.content[caption_rows, : txt.local.shape[1]].to(run.device)  # batches cut the padding
    inside = task.inside[tiles].to(run.device)[:, : img.local.shape[1]]
    return img, txt, content, inside


def mosaic_step_loss(run: TrainRun, gen: torch.Generator) -> torch.Tensor:
    """The grounding loss on a batch of training mosaics, one caption of one tile each."""
    task, pairs = run.mosaic, run.train_pairs
    n = max(1, run.options.batch_size // 4)
    rows = torch.randint(len(task.train_plan), (n,), generator=gen)
    tiles = torch.randint(len(MOSAIC_TILES), (n,), generator=gen)
    caps = []
    for m, t in zip(rows.tolist(), tiles.tolist()):
        choices = pairs.caption_rows[task.train_plan[m].items[t]]
        caps.append(choices[int(torch.randint(len(choices), (1,), generator=gen))])
    img, txt, content, inside = _mosaic_batch(run, task.train, rows, tiles, torch.tensor(caps))
    return tile_grounding_loss(txt.local, content, img.local, img.mask, inside, run.options.mosaic_temperature)


def mosaic_pointing(run: TrainRun) -> dict[str, float]:
    """Validation pointing game on mosaics: percent of content words whose best cell lies in their caption's tile."""
    task, pairs = run.mosaic, run.val_pairs
    triples = [(m, t, c) for m, mosaic in enumerate(task.val_plan) for t, item in enumerate(mosaic.items)
               for c in pairs.caption_rows[item]]
    hits = words = 0
    chance = 0.0
    run.model.eval()
    with torch.inference_mode():
        for start in range(0, len(triples), 256):
            m, t, c = (torch.tensor(x) for x in zip(*triples[start : start + 256]))
            img, txt, content, inside = _mosaic_batch(run, task.val, m, t, c)
            h, w, ch = tile_pointing(txt.local, content, img.local, img.mask, inside)
            hits, words, chance = hits + h, words + w, chance + ch
    return {"pointing": round(100.0 * hits / max(1, words), 2), "chance": round(100.0 * chance / max(1, words), 2)}


def prepare_run(options: TrainOptions, config: ModelConfig) -> TrainRun:
    """Load the data, compute or load the backbone features, build the model and optimiser, resume a checkpoint."""
    if options.features is None and not options.images.is_dir():
        raise FileNotFoundError(f"images folder not found: {options.images}")
    if options.loss not in LOSSES:
        raise ValueError(f"unknown loss {options.loss!r}; choose from {sorted(LOSSES)}")
    if config.global_companion is not None:
        raise ValueError("a model with a global companion is combined from two trained models "
                         "(alignsearch combine), not trained; train each of them instead")
    identity = run_identity(options, config)
    resume = _resume_checked(options, identity)  # before any feature is computed
    records = load_dataset(options.dataset)
    train_records = select_split(records, "train", options.val_size, options.seed)
    val_records = select_split(records, "val", options.val_size, options.seed)
    if not train_records:
        raise DatasetError(f"{options.dataset}: no training images")
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    model = create_model(config).to(device)
    all_records = train_records + val_records
    filenames = list(dict.fromkeys(r.filename for r in all_records))
    row_of = {f: i for i, f in enumerate(filenames)}
    views, failures = _image_sources(model, filenames, options)
    for path, reason in failures:
        log.warning("skipped %s: %s", path, reason)
    texts, offsets = [], {}
    for r in all_records:
        offsets[r.filename] = len(texts)
        texts.extend(r.captions)
    txt_feats = LiveTextFeatures(model, texts) if _has_trainable(model.text_backbone) else text_features(
        model, texts, options.cache_dir)
    train_pairs = _pairs(train_records, row_of, views[0].ok, offsets)
    val_pairs = _pairs(val_records, row_of, views[0].ok, offsets)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(parameter_groups(model, options), lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = max(1, len(train_pairs.image_rows) // options.batch_size) * 5
    run = TrainRun(
        options, model, device, views[0], views, txt_feats, failures, train_pairs, val_pairs, params, opt,
        steps_per_epoch, steps_per_epoch * options.epochs, LOSSES[options.loss],
        {"margin": options.margin} if options.loss == "triplet" else {"temperature": options.temperature},
    )
    if options.mosaic_loss_weight > 0:
        run.mosaic = _mosaic_task(model, options, [options.images / f for f in filenames], train_pairs, val_pairs,
                                  texts)
    meta = _load_checkpoint(options.out, model, opt) if resume else None
    if meta:
        run.start_epoch, run.best, run.history = meta["epoch"] + 1, meta["best"], meta["history"]
        log.info("resumed after epoch %d of %d", run.start_epoch, options.epochs)
    run.identity = identity
    return run


def _resume_checked(options: TrainOptions, identity: dict) -> bool:
    """Whether to load the checkpoint in ``options.out``: only with ``resume``, and only one written by a run of
    the same config and options; a checkpoint found without ``resume`` is an error, not overwritten."""
    _, meta_path = _checkpoint_paths(options.out)
    if not meta_path.is_file():
        return False
    if not options.resume:
        raise CheckpointError(f"{options.out} holds a checkpoint of an earlier run: add --resume to continue it, "
                              "or choose another --out")
    saved = json.loads(meta_path.read_text()).get("identity")
    if saved is not None and saved != identity:
        changed = sorted({k for part in ("config", "options") for k in identity[part]
                          if saved.get(part, {}).get(k) != identity[part][k]})
        raise CheckpointError(f"{options.out}: its checkpoint was written with other settings ({', '.join(changed)}); "
                              "resume with the same ones, or choose another --out")
    return True


def train_epoch(run: TrainRun, epoch: int) -> float:
    """One epoch: five shuffled passes over the training images; returns the epoch's mean loss."""
    options, model, pairs = run.options, run.model, run.train_pairs
    model.train()
    gen = torch.Generator().manual_seed(options.seed * 1000 + epoch)
    total, n = 0.0, 0
    step = epoch * run.steps_per_epoch
    batches = []
    for _round in range(5):
        order = torch.randperm(len(pairs.image_rows), generator=gen)
        usable = len(order) - len(order) % options.batch_size or len(order)
        batches += [order[i : i + options.batch_size] for i in range(0, usable, options.batch_size)]
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{options.epochs}", unit="step", disable=not options.progress)
    for idx in bar:
        caps = torch.tensor([
            pairs.caption_rows[i][int(torch.randint(len(pairs.caption_rows[i]), (1,), generator=gen))]
            for i in idx.tolist()
        ])
        source = run.views[int(torch.randint(len(run.views), (1,), generator=gen))] if len(run.views) > 1 else run.images
        img = model.image_head_forward(source.batch(pairs.image_rows[idx], run.device))
        txt = model.text_head_forward(run.texts.batch(caps, run.device))
        loss = run.loss_fn(model.local_scores(txt, img), **run.loss_kwargs)
        loss = loss + options.global_loss_weight * run.loss_fn(txt.global_emb @ img.global_emb.T, **run.loss_kwargs)
        if run.mosaic is not None:
            loss = loss + options.mosaic_loss_weight * mosaic_step_loss(run, gen)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.params, 2.0)
        for group in run.optimizer.param_groups:
            group["lr"] = group.get("peak_lr", options.lr) * learning_rate_factor(step, run.steps_per_epoch,
                                                                                  run.total_steps)
        run.optimizer.step()
        step += 1
        total += loss.item()
        n += 1
        bar.set_postfix(loss=f"{total / n:.3f}")
    return total / max(1, n)


def evaluate_epoch(run: TrainRun) -> dict[str, dict[str, float]]:
    """Validation metrics (global, exhaustive, two-stage) of the current model at its configured local weight."""
    g, local = validation_scores(run.model, run.images, run.texts, run.val_pairs)
    fused = alignment.fuse(g, local, run.model.config.local_weight)
    metrics = evaluate_scores(g, fused, run.val_pairs.text_to_image, run.options.candidates)
    if run.mosaic is not None and run.mosaic.val is not None:
        metrics["mosaic"] = mosaic_pointing(run)
    return metrics


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux and macOS; 0 where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def select_epoch(run: TrainRun, epoch: int, loss: float, seconds: float, metrics: dict[str, dict[str, float]]) -> None:
    """Record the epoch, save the model when its two-stage rsum is the best so far, and write the checkpoint."""
    row = {"epoch": epoch + 1, "loss": loss, "seconds": round(seconds, 2), "peak_rss_mb": peak_rss_mb(),
           **{f"val_{m}_rsum": v["rsum"] for m, v in metrics.items() if "rsum" in v},
           **{f"val_{m}_{k}": x for m, v in metrics.items() if "rsum" not in v for k, x in v.items()}}
    run.history.append(row)
    log.info("epoch %d: %s", epoch + 1, row)
    if run.options.progress:
        print(json.dumps(row), flush=True)
    score = metrics["two-stage"]["rsum"]
    if run.best is None or score > run.best["score"]:
        run.best = {"score": score, "epoch": epoch + 1}
        save_model(run.model, run.out_model)
    _save_checkpoint(run.options.out, run.model, run.optimizer,
                     {"epoch": epoch, "best": run.best, "history": run.history, "identity": run.identity})


def finish(run: TrainRun) -> dict:
    """Reload the best model, tune its local weight on validation, save it and write ``training.json``."""
    options, val_pairs = run.options, run.val_pairs
    final = load_model(run.out_model, device=str(run.device))
    summary = {"best_epoch": run.best["epoch"] if run.best else None, "history": run.history,
               "skipped_images": [p for p, _ in run.failures],
               "options": {k: str(v) for k, v in asdict(options).items()}}
    if options.tune_local_weight:
        g, local = validation_scores(final, run.images, run.texts, val_pairs)
        weight, sweep = tune_local_weight(g, local, val_pairs.text_to_image, options.candidates)
        final.config.local_weight = weight
        summary["local_weight_sweep"] = {str(k): v for k, v in sweep.items()}
    g, local = validation_scores(final, run.images, run.texts, val_pairs)
    summary["validation"] = evaluate_scores(g, alignment.fuse(g, local, final.config.local_weight),
                                            val_pairs.text_to_image, options.candidates)
    summary["fingerprint"] = save_model(final, run.out_model)
    (options.out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def train(options: TrainOptions, config: ModelConfig) -> dict:
    """Train heads for ``config`` on the dataset; the best epoch on validation is saved to ``options.out``."""
    run = prepare_run(options, config)
    try:
        for epoch in range(run.start_epoch, options.epochs):
            t0 = time.time()
            loss = train_epoch(run, epoch)
            metrics = evaluate_epoch(run)
            select_epoch(run, epoch, loss, time.time() - t0, metrics)
    except KeyboardInterrupt:
        print(f"{len(run.history)} of {options.epochs} epochs are saved in {options.out}: the same command with "
              "--resume continues from there", file=sys.stderr)
        raise
    return finish(run)
