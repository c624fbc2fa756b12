"""The ``contrastlab`` command line: train, eval (knn, linear, finetune), recipes, demo, plot, views, export, import,
bench, published, table, study.

Every command takes ``key=value`` overrides after its positional arguments. Errors caused by input
(unknown keys, missing datasets, damaged checkpoints) print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from contrastlab import __version__
from contrastlab.engine.preemption import EXIT_PREEMPTED, PreemptedError
from contrastlab.errors import ContrastlabError

SMOKE_OVERRIDES = [
    "data.name=demo", "data.root=null", "data.train_split=train", "data.test_split=test", "data.class_list=null",
    "data.labeled_split=null", "data.subset=64", "data.epoch_length=0", "data.batch_size=8", "data.workers=0",
    "train.epochs=1", "train.max_steps=2", "train.device=cpu", "train.log_every=1",
    "monitor.max_bank=64", "monitor.max_test=32", "monitor.knn_k=10",
    "linear.epochs=1", "linear.batch_size=16", "overwrite=true",
]


def smoke_overrides(cfg) -> list[str]:
    """Overrides that turn any recipe into a 2-step CPU run on the embedded demo data.

    Every component of the recipe (planner, photometric recipe, backbone, method, optimiser,
    schedules, checkpoint, the observers it lists) still runs; only the data, batch, resolution and
    length shrink. Resolution: 16 px for CIFAR stems and the CIFAR networks of the zoo, 32 px for
    ImageNet stems (torchvision ResNets without ``cifar_stem``).
    Mixed precision runs in fp32: CPU autocast is not the GPU code path, and bf16 convolutions are
    about 20 times slower than fp32 on CPUs without bf16 units (the methods' tests run bf16 autocast
    on small networks instead). The data is an evenly spaced subset of 64 demo images. A learnable
    memory shrinks to 8 columns, so CaCo's warm start takes one step; crop strategies with a localiser
    train two one-step epochs so that the localiser runs between them; a method may shrink its own sizes
    (:meth:`contrastlab.Method.smoke_overrides`, e.g. Barlow Twins' projector widths).
    """
    from contrastlab.methods import method_defaults
    from contrastlab.registry import BACKBONES, METHODS, PLANNERS

    small_net = cfg.model.cifar_stem or BACKBONES.info(cfg.model.arch)["small_input"]
    extra = [f"data.image_size={16 if small_net else 32}"]
    if cfg.train.precision != "fp32":
        extra.append("train.precision=fp32")
    if "memory_size" in cfg.method.params:
        extra.append("method.memory_size=8")
    extra += PLANNERS[cfg.views.planner].smoke_overrides(small_net)  # e.g. a localiser's two one-step epochs
    values = {**method_defaults(cfg.method.name), **cfg.method.params}  # what the run builds
    extra += METHODS[cfg.method.name].smoke_overrides(values)  # e.g. a projector's widths
    return SMOKE_OVERRIDES + extra


def _load(recipe: str, overrides: list[str], smoke: bool):
    from contrastlab.config.load import load_config

    cfg = load_config(recipe, overrides)
    if smoke:
        cfg = load_config(recipe, smoke_overrides(cfg) + overrides)  # the user's overrides win
        if not cfg.out:
            cfg.out = str(Path("runs") / "smoke" / recipe.replace("/", "_").removesuffix(".yaml"))
    return cfg


def cmd_recipes(args: argparse.Namespace) -> int:
    from contrastlab.config.load import read_recipe, recipe_names

    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {read_recipe(name).get('description', '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from contrastlab.config.load import dump_config, is_finetune_recipe, is_linear_recipe
    from contrastlab.engine.trainer import train

    if is_linear_recipe(args.recipe) or is_finetune_recipe(args.recipe):
        kind = "linear" if is_linear_recipe(args.recipe) else "finetune"
        raise ContrastlabError(f"{args.recipe} is a {'linear-probe' if kind == 'linear' else 'fine-tuning'} recipe; "
                               f"run it with `contrastlab eval {kind} CHECKPOINT --recipe {args.recipe}`")
    cfg = _load(args.recipe, args.overrides, args.smoke)
    if args.show:  # the complete configuration that runs: the method's defaults included, switches as comments
        print("".join(f"# {note}\n" for note in cfg.notes) + dump_config(cfg), end="")
        return 0
    from contrastlab.engine.distributed import is_main_process

    results = train(cfg, args.recipe, trust_pickle=args.trust_pickle)
    if is_main_process():
        print(json.dumps(results))
    return 0


def random_init_knn(cfg) -> float:
    """kNN top-1 of the recipe's backbone at its initial weights (the same seed as training)."""
    import torch

    from contrastlab import assemble
    from contrastlab.engine.device import select_device
    device = select_device(cfg.train.device)
    bank = assemble.labeled_dataset(cfg)
    test = assemble.dataset(cfg, cfg.data.test_split)
    torch.manual_seed(cfg.seed)
    method = assemble.method(cfg, len(bank.classes), bank.targets).to(device)
    return assemble.knn_monitor(cfg, bank, test, device).evaluate(method.backbone)


def cmd_demo(args: argparse.Namespace) -> int:
    from contrastlab.engine.trainer import train

    overrides = ["overwrite=true"] + args.overrides
    cfg = _load("demo", overrides, smoke=False)
    results = train(cfg, "demo")
    results["knn_top1_random_init"] = random_init_knn(cfg)
    results["knn_gain"] = results["knn_top1"] - results["knn_top1_random_init"]
    Path(results["out"], "results.json").write_text(json.dumps(results, indent=2))
    out = Path(results["out"])
    if (out / "plots").is_dir() and (out / "metrics.jsonl").is_file():
        _redraw_curves(out)  # the kNN curve with the random-init accuracy as its reference line
    print(json.dumps(results))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from contrastlab.bench import PARTS, run_benchmark, write_json

    cfg = _load(args.recipe, args.overrides, smoke=False)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    summary = run_benchmark(cfg, shape=args.shape, images=args.images, steps=args.steps, warmup=args.warmup,
                            workers=args.workers, jpeg=args.jpeg, compile_step=args.compile, parts=parts)
    if args.out:
        write_json(summary, args.out)
        print(f"wrote {args.out}")
    return 0


def _eval_config(args: argparse.Namespace):
    import yaml

    from contrastlab.config.load import (
        config_from_dict,
        finetune_section,
        linear_section,
        parse_override,
        set_dotted,
        upgrade_saved_config,
    )
    from contrastlab.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    tree = upgrade_saved_config(yaml.safe_load(ckpt["config"]), ckpt.get("version", 1))
    if getattr(args, "recipe", None):
        read = {"linear": linear_section, "finetune": finetune_section}.get(args.kind)  # the protocol's section
        if read is None:
            raise ContrastlabError(f"--recipe gives a linear/ or finetune/ protocol; `eval {args.kind}` takes none")
        tree[args.kind] = {**tree.get(args.kind, {}), **read(args.recipe)}
    if args.data:
        tree["data"]["name"] = args.data
        tree["data"]["class_list"] = None  # a class list selects classes of the checkpoint's dataset only
    for text in args.overrides:
        set_dotted(tree, *parse_override(text))
    return ckpt, config_from_dict(tree)


def _views_on_device(cfg, device, *datasets) -> bool:
    """``data.pipeline`` for evaluation, as for training: ``gpu`` renders on the device (datasets held there, or
    image files decoded per batch), ``auto`` only on a GPU that holds every dataset."""
    from contrastlab.data.device_images import file_paths, fits_on_device, image_shape

    if cfg.data.pipeline == "cpu":
        return False
    if cfg.data.pipeline == "auto":
        return all(fits_on_device(d, device)[0] for d in datasets)
    return all(image_shape(d) is not None or file_paths(d) is not None for d in datasets)


def _eval_out(args: argparse.Namespace, cfg) -> Path:
    """Where an evaluation's JSON goes: ``--out``; for a run's ``checkpoints/last.pt``
    ``<run>/eval_<kind>_<data>[_peerN][_<network>][_stored].json`` (``--network`` other than the run's; another checkpoint of the run adds ``_<its name>``); for a
    checkpoint anywhere else ``<its name>.eval_<kind>_<data>[...].json`` beside it."""
    if args.out:
        return Path(args.out)
    suffix = f"_peer{args.peer}" if args.peer is not None else ""
    network = getattr(args, "network", None)
    suffix += f"_{network}" if network and network != cfg.model.evaluated_network else ""  # not the run's own
    suffix += "_stored" if getattr(args, "stored_classifier", False) else ""
    checkpoint = Path(args.checkpoint)
    name = f"eval_{args.kind}_{cfg.data.name}{suffix}"
    if checkpoint.parent.name != "checkpoints":  # not in a run directory: named after the checkpoint, beside it
        return checkpoint.parent / f"{checkpoint.stem}.{name}.json"
    own = "" if checkpoint.name == "last.pt" else f"_{checkpoint.stem}"
    return checkpoint.parent.parent / f"{name}{own}.json"


def _eval_info(args: argparse.Namespace, cfg, ckpt) -> dict:
    """What every evaluation's result says about its input."""
    return {"checkpoint": str(args.checkpoint), "epoch": ckpt["epoch"], "data": cfg.data.name, "peer": args.peer or 0,
            "network": _network(args, cfg), "train_split": cfg.data.labeled_split or cfg.data.train_split, "test_split": cfg.data.test_split}


def _network(args: argparse.Namespace, cfg) -> str:
    """``--network``, else the run's ``model.evaluated_network``."""
    return getattr(args, "network", None) or cfg.model.evaluated_network


def _backbone_module(args: argparse.Namespace, cfg) -> str:
    """The checkpoint's module that ``--network`` names: ``backbone`` (online) or the method's momentum copy."""
    from contrastlab.errors import ConfigError
    from contrastlab.methods.base import evaluated_module
    from contrastlab.registry import METHODS

    module = evaluated_module(METHODS[cfg.method.name], _network(args, cfg))
    if module != "backbone" and args.peer is not None:
        raise ConfigError("the momentum network is one backbone; --peer selects a cohort peer's online network: "
                          "give one of them")
    return module


def _pretrained_backbone(args: argparse.Namespace, cfg, ckpt, device):
    """The checkpoint's backbone (``--peer``, ``--network``) on ``device``; for ``eval linear`` with
    ``linear.n_last_blocks`` > 1 or ``linear.avgpool_patch_tokens`` the ViT's last-blocks features (DINO's probe)."""
    from contrastlab import assemble
    from contrastlab.engine.checkpoint import load_backbone_weights

    net, dim = assemble.backbone(cfg)
    load_backbone_weights(net, ckpt, str(args.checkpoint), peer=args.peer, module=_backbone_module(args, cfg))
    if args.kind == "linear" and (cfg.linear.n_last_blocks != 1 or cfg.linear.avgpool_patch_tokens):
        from contrastlab.models.vit_features import LastBlocksFeatures

        net = LastBlocksFeatures(net, cfg.linear.n_last_blocks, cfg.linear.avgpool_patch_tokens)
        dim = net.dim
    return net.to(device), dim


def _eval_knn(args: argparse.Namespace, cfg, ckpt, device) -> dict:
    """Weighted kNN on the frozen backbone's features."""
    from contrastlab import assemble

    net, _ = _pretrained_backbone(args, cfg, ckpt, device)
    train_base, test_base = assemble.labeled_dataset(cfg), assemble.dataset(cfg, cfg.data.test_split)
    monitor = assemble.knn_monitor(cfg, train_base, test_base, device,
                                   on_device=_views_on_device(cfg, device, train_base, test_base))
    return {"knn_top1": monitor.evaluate(net), **monitor.describe()}


def _eval_linear(args: argparse.Namespace, cfg, ckpt, device) -> dict:
    """A linear probe trained on the frozen backbone, or (``--stored-classifier``) the checkpoint's own classifier."""
    import torch

    from contrastlab import assemble
    from contrastlab.data.subsets import evenly_spaced

    net, dim = _pretrained_backbone(args, cfg, ckpt, device)
    test_base = evenly_spaced(assemble.dataset(cfg, cfg.data.test_split), cfg.linear.max_test)
    if args.stored_classifier:
        from contrastlab.engine.checkpoint import stored_classifier
        from contrastlab.eval.linear import classifier_accuracy

        weight, bias, source = stored_classifier(ckpt, args.peer)
        return {**classifier_accuracy(net, weight, bias, assemble.evaluation_views(cfg, test_base), device=device,
                                      batch_size=cfg.linear.batch_size, workers=cfg.data.workers,
                                      on_device=_views_on_device(cfg, device, test_base)), "classifier": source}
    from contrastlab.eval.linear import linear_probe
    from contrastlab.views import eval_view_dataset, make_photometric, make_planner
    from contrastlab.views.dataset import ViewDataset

    train_base = evenly_spaced(assemble.labeled_dataset(cfg), cfg.linear.max_train)
    mean, std = assemble.normalization(cfg)
    size = assemble.image_size(cfg)
    if cfg.linear.augment:
        train_set = ViewDataset(train_base, make_planner("random_resized", num_views=1, scale=tuple(cfg.linear.scale)),
                                [size], [make_photometric("none", view=0, mean=mean, std=std)])
    else:
        train_set = eval_view_dataset(train_base, size, mean, std, crop_fraction=cfg.linear.crop_fraction)
    torch.manual_seed(cfg.seed)
    return linear_probe(net, dim, len(train_base.classes), train_set, assemble.evaluation_views(cfg, test_base),
                        cfg.linear, device=device, workers=cfg.data.workers, seed=cfg.seed,
                        on_device=_views_on_device(cfg, device, train_base, test_base),
                        log=lambda s: print(s, file=sys.stderr, flush=True))


def _eval_finetune(args: argparse.Namespace, cfg, ckpt, device) -> dict:
    """End-to-end fine-tuning (``finetune:`` protocol); its checkpoints and metrics beside the result."""
    from contrastlab.eval.finetune import finetune_checkpoint

    folder = _eval_out(args, cfg).with_suffix("")  # <run>/eval_finetune_<data>/
    return finetune_checkpoint(ckpt, cfg, str(args.checkpoint), folder, peer=args.peer, resume=args.resume,
                               module=_backbone_module(args, cfg),
                               trust_pickle=args.trust_pickle)


EVALUATIONS = {"knn": _eval_knn, "linear": _eval_linear, "finetune": _eval_finetune}
"""``contrastlab eval KIND``: kind -> evaluation ``(args, cfg, checkpoint, device) -> result``."""


def cmd_eval(args: argparse.Namespace) -> int:
    from contrastlab.engine.checkpoint import write_atomically
    from contrastlab.engine.device import select_device
    from contrastlab.engine.distributed import is_main_process

    if args.resume and args.kind != "finetune":
        raise ContrastlabError(f"--resume continues a fine-tuning run (`eval finetune`); `eval {args.kind}` has none")
    if args.stored_classifier and args.kind != "linear":
        raise ContrastlabError("--stored-classifier evaluates a stored linear classifier: use `eval linear`")
    ckpt, cfg = _eval_config(args)
    device = select_device(cfg.train.device)
    result = {**EVALUATIONS[args.kind](args, cfg, ckpt, device), **_eval_info(args, cfg, ckpt)}
    if is_main_process():
        print(json.dumps(result), flush=True)  # first: a result that cannot be written is not lost
        out = _eval_out(args, cfg)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(json.dumps(result, indent=2).encode(), out)
        except OSError as exc:
            raise ContrastlabError(f"could not write the result to {out} ({exc.strerror or exc}); it is printed "
                                   "above. Pass --out FILE to write it elsewhere") from exc
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from contrastlab.importers import import_checkpoint

    summary = import_checkpoint(args.checkpoint, args.source, args.out, recipe=args.recipe,
                                overrides=args.overrides, allow_pickle=args.trust_pickle, classifier=args.classifier)
    print(json.dumps(summary))
    return 0


def _redraw_curves(run: Path) -> list[Path]:
    """Draw a run's training curves from its ``metrics.jsonl``, with the references its ``results.json`` holds."""
    from contrastlab.observers.metrics_log import MetricsLog
    from contrastlab.viz.curves import plot_training_curves, references_from_results

    records = MetricsLog(run / "metrics.jsonl").read()
    if not records:
        raise ContrastlabError(f"{run / 'metrics.jsonl'} is missing or empty; pass a run directory written by `contrastlab train`")
    return plot_training_curves(records, run / "plots", references_from_results(run))


def cmd_plot(args: argparse.Namespace) -> int:
    for path in _redraw_curves(Path(args.run)):
        print(path)
    return 0


def cmd_plot_scores(args: argparse.Namespace) -> int:
    from contrastlab.viz.score_plots import run_from_args

    for run in args.runs:
        if not (Path(run) / "scores").is_dir() and not Path(run).name == "scores":
            raise ContrastlabError(f"{run} holds no scores/ folder; train with score_statistics in the config list "
                                   "observers to record positive/negative score statistics")
    try:
        paths = run_from_args(args)
    except (FileNotFoundError, ValueError) as exc:
        raise ContrastlabError(str(exc)) from exc
    for path in paths:
        print(path)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from contrastlab.studies.table import cmd_table as table

    return table(args)


def cmd_views(args: argparse.Namespace) -> int:
    from contrastlab import assemble
    from contrastlab.viz.view_sheet import ImageList, draw_view_sheet

    cfg = _load(args.recipe, [*args.overrides, f"seed={args.seed}"], smoke=False)
    images = ImageList(args.images, limit=args.count)
    views = assemble.training_views(cfg, images)
    views.return_boxes = True
    mean, std = assemble.normalization(cfg)
    label = views.planner.label()
    planner = cfg.views.planner + (f" ({label})" if label else "")
    title = f"{args.recipe}: planner {planner}, photometric {cfg.views.photometric}, seed {args.seed}"
    localised = None
    if args.checkpoint:
        from contrastlab.engine.checkpoint import load_backbone_weights, load_checkpoint
        from contrastlab.views.planners.base import DEFAULT_LOCALISATION
        from contrastlab.viz.view_sheet import localise_images

        backbone, _ = assemble.backbone(cfg)
        load_backbone_weights(backbone, load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle),
                              source=args.checkpoint)
        loc = views.planner.localisation or DEFAULT_LOCALISATION
        localised = localise_images(backbone, images, assemble.image_size(cfg), mean, std,
                                    kind=loc.heatmap, threshold=loc.threshold)
        if views.planner.localisation is not None:  # ContrastiveCrop / SemanticCrop sample around the boxes
            views.planner.store.fill(localised.boxes)
            views.planner.store.set_enabled(True)
        title += f"\nheatmap {loc.heatmap}, threshold {loc.threshold:g}, {Path(args.checkpoint).name}"
    print(draw_view_sheet(views, images, mean, std, args.out, title=title, localised=localised))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from contrastlab.engine.checkpoint import backbone_state
    from contrastlab.export import export_backbone

    ckpt, cfg = _eval_config(args)
    result = export_backbone(backbone_state(ckpt, args.peer, _backbone_module(args, cfg)), cfg.model.arch, args.format, args.out,
                             cifar_stem=cfg.model.cifar_stem)
    print(json.dumps({"checkpoint": str(args.checkpoint), "epoch": ckpt["epoch"], **result}))
    return 0


def cmd_published(args: argparse.Namespace) -> int:
    """Published rows, one a line; no match is an error (exit status 2) naming what was searched."""
    from contrastlab.studies.published import format_rows, rows

    selected = rows(args.filter)
    if not selected:
        raise ContrastlabError(f"no published row matches {args.filter!r} (searched: ids, tables and recipe names; "
                               "substrings, or * ? [ ] wildcards); `contrastlab published` lists every row")
    print(format_rows(selected, long=args.long))
    return 0


def _trust_pickle_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--trust-pickle``, the one opt-in of every command that opens a checkpoint (:mod:`contrastlab.safe_load`)."""
    parser.add_argument("--trust-pickle", action="store_true", help=f"also open {what} when it holds Python objects "
                        "besides tensors and plain containers: this may run code from the file, so only for a file "
                        "from a source you trust")


def _network_flag(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--network", choices=["online", "momentum"], default=None,
                        help=f"which backbone to {verb}: the trained (online) one, or the method's momentum copy "
                        "(DINO's teacher, which its paper evaluates; MoCo's key encoder; BYOL's target); default: "
                        "the run's model.evaluated_network")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"contrastlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list recipes with a one-line description")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="train a recipe: contrastlab train RECIPE [key=value ...]")
    p.add_argument("recipe", help="recipe name (see `contrastlab recipes`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.3 data.root=./data out=runs/a")
    p.add_argument("--smoke", action="store_true", help="2 steps on the embedded demo data, CPU, small resolution; "
                   "key=value overrides still apply (e.g. train.device=cuda)")
    p.add_argument("--show", action="store_true", help="print the complete config that would run (defaults included) "
                   "and exit")
    _trust_pickle_flag(p, "a resume=FILE checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: kNN, linear probe or end-to-end fine-tuning")
    p.add_argument("kind", choices=list(EVALUATIONS))
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=./data linear.epochs=100")
    p.add_argument("--data", help="dataset name to evaluate on (default: the training dataset)")
    p.add_argument("--recipe", help="protocol recipe whose section replaces the run's own: linear/<name> for "
                   "`eval linear`, finetune/<name> for `eval finetune`")
    p.add_argument("--resume", help="eval finetune: continue from a fine-tuning checkpoint, or 'auto' (the last one "
                   "in <run>/eval_finetune_<data>/checkpoints)")
    p.add_argument("--peer", type=int, default=None, help="cohort methods (MCL): evaluate peer N (default 0)")
    _network_flag(p, "evaluate")
    p.add_argument("--stored-classifier", action="store_true", help="eval linear: report the test accuracy of the "
                   "classifier stored in the checkpoint (an imported linear-probe file's, or an MCL peer's) instead "
                   "of training a probe")
    p.add_argument("--out", help="JSON result path (default: <run>/eval_<kind>_<data>[_peerN][_stored].json for a "
                   "run's last.pt; <checkpoint name>.eval_<kind>_<data>[...].json beside any other checkpoint)")
    _trust_pickle_flag(p, "the checkpoint (and a --resume file)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("import", help="convert a released checkpoint of an upstream project into a contrastlab "
                       "checkpoint (docs/importing.md)")
    p.add_argument("checkpoint", help="the released file (.pth.tar / .pth)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. data.root=./data")
    p.add_argument("--from", dest="source", required=True, help="the project that wrote it: mocov3, jointcrop, caco, "
                   "ccrop, ft, mcl, barlowtwins, vicreg or swav")
    p.add_argument("--out", required=True, help="the contrastlab checkpoint to write (.pt)")
    p.add_argument("--recipe", help="the recipe to build the model from (default: the importer's choice for the file)")
    _trust_pickle_flag(p, "the released file (released checkpoints normally load without it)")
    p.add_argument("--classifier", help="a linear-probe file that holds only the classifier (FT's main_linear.py, SwAV's and DINO's eval_linear.py), "
                   "trained on this pre-training file's backbone: stored for `eval linear --stored-classifier`")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("demo", help="train the demo recipe on the embedded data and compare with random init")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("views", help="draw the boxes and rendered views a recipe's planner makes on real images")
    p.add_argument("recipe", help="recipe name or YAML path; its views.* and data.image_size are used")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. views.joint_beta=-2")
    p.add_argument("--images", required=True, help="a folder of image files (jpg, png, ...)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--count", type=int, default=4, help="number of images (first in name order; default 4)")
    p.add_argument("--seed", type=int, default=0, help="random stream of the planner and photometrics")
    p.add_argument("--checkpoint", help="a training checkpoint: show its backbone's heatmap and box per image, "
                   "and crops sampled around that box (ContrastiveCrop / SemanticCrop)")
    _trust_pickle_flag(p, "the --checkpoint file")
    p.set_defaults(func=cmd_views)

    p = sub.add_parser("export", help="write a checkpoint's backbone for torchvision, timm or detectron2")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--format", required=True, choices=["torchvision", "timm", "detectron2"])
    p.add_argument("--out", required=True, help="output file (.pth for torchvision/timm, .pkl for detectron2)")
    p.add_argument("--peer", type=int, default=None, help="cohort methods (MCL): export peer N (default 0)")
    _network_flag(p, "export")
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    _trust_pickle_flag(p, "the checkpoint")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="training throughput: model step alone, GPU pipeline, CPU torchvision pipeline")
    p.add_argument("recipe", help="recipe name or YAML path (its model, method, views and batch size are used)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.symmetric=true train.precision=bf16")
    p.add_argument("--shape", choices=["cifar", "imagenet"], default="cifar",
                   help="synthetic source images: cifar 32x32, imagenet 256x320 (default cifar)")
    p.add_argument("--images", type=int, default=0, help="synthetic dataset size (default max(4 batches, 1024))")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the CPU baseline (default 4)")
    p.add_argument("--jpeg", action="store_true", help="GPU pipeline decodes JPEG bytes per batch (ImageFolder)")
    p.add_argument("--compile", action="store_true", help="torch.compile the method's forward")
    p.add_argument("--parts", default="model,gpu,cpu,render,cpu_render",
                   help="comma-separated parts: model,gpu,cpu,render,cpu_render (the default), eval,cpu_eval "
                   "(the kNN monitor's feature pass, views from the device store or CPU workers) and "
                   "compiled_render (the renderer through torch.compile, data.compile_views)")
    p.add_argument("--out", help="write the figures as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("published", help="published rows (paper / README numbers) and the recipes that reproduce them")
    p.add_argument("filter", nargs="?", help="keep rows whose id, table or recipe contains it (wildcards * ? allowed)")
    p.add_argument("--long", action="store_true", help="also print each row's label, protocol recipe and note")
    p.set_defaults(func=cmd_published)

    p = sub.add_parser("plot", help="(re)draw training curves of a run directory; `plot scores RUN...` for score figures")
    p.add_argument("run")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("table", help="mean ± std over seeds of run directories made by hand (docs/study_tables.md)")
    p.add_argument("runs", nargs="+", help="run directories; runs whose config.yaml differs only in seed/out are "
                   "one row")
    p.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    p.add_argument("--figure", help="also write a bar chart to PATH and the kNN curves to <PATH stem>_curves.png")
    p.set_defaults(func=cmd_table)

    from contrastlab.studies.cli import add_study_parser

    add_study_parser(sub)  # study list | run | status | table (contrastlab.studies)
    return parser


def build_score_plot_parser() -> argparse.ArgumentParser:
    """``contrastlab plot scores RUN [RUN ...] [--label L ...] [--out DIR]`` (Feature Transformation's figures)."""
    from contrastlab.viz.score_plots import add_arguments

    parser = argparse.ArgumentParser(prog="contrastlab plot scores",
                                     description="positive/negative score-distribution figures of one or more runs")
    parser.set_defaults(func=cmd_plot_scores)
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["plot", "scores"]:
        parser = build_score_plot_parser()
        args, extra = parser.parse_args(argv[2:]), []
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow flags such as --smoke
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except PreemptedError as exc:
        print(f"contrastlab: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except ContrastlabError as exc:
        print(f"contrastlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("contrastlab: interrupted", file=sys.stderr)
        distributed = sys.modules.get("contrastlab.engine.distributed")  # loaded when a process group may exist
        if distributed is not None:
            distributed.leave_group_at_exit()
        return 130
    except BrokenPipeError:  # the reader of our output went away (`contrastlab recipes | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
