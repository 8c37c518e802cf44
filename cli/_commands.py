"""Sub-command bodies: argument handling and printing only; the work lives in the packages."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import polars as pl

from tokenlake import store
from tokenlake.extract import (
    ExtractRequest,
    ModelRequestError,
    SourceError,
    draw_subset,
    open_source,
)
from tokenlake.extract import extract as run_extraction
from tokenlake.sql import query_text, view_names

USER_ERRORS = (store.LakeError, ModelRequestError, SourceError, ValueError, FileNotFoundError)


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def subset(args: argparse.Namespace) -> int:
    source = open_source(args.data, split=args.split)
    table = draw_subset(source, n=args.n, seed=args.seed, limit=args.limit)
    path = store.write_subset(args.lake, args.name, table)
    print(f"subset {args.name}: {table.num_rows} of {source.num_rows} images from {args.data}"
          f"{'' if args.split is None else f' [{args.split}]'} (seed {args.seed}) -> {path}")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(text.rstrip("/")).name or text).strip("_").lower()


def _adhoc_subset(args: argparse.Namespace) -> str:
    """--data without --subset: a throwaway subset of the first N images, kept for provenance."""
    source = open_source(args.data, split=args.split)
    table = draw_subset(source, n=None, limit=args.limit)
    name = f"{_slug(args.data)}-{'first' + str(args.limit) if args.limit else 'all'}"
    store.write_subset(args.lake, name, table)
    return name


def _slurm_options(args: argparse.Namespace) -> dict:
    opts = {"partition": args.slurm_partition, "gpus": args.slurm_gpus, "cpus": args.slurm_cpus,
            "time_min": args.slurm_time}
    if args.slurm_array_parallelism:
        opts["array_parallelism"] = args.slurm_array_parallelism
    return opts


def extract(args: argparse.Namespace) -> int:
    subset_name = args.subset or _adhoc_subset(args)
    if args.subset and args.limit:
        raise ValueError("--limit goes with --data; make a smaller subset with `tokenlake subset`")
    request = ExtractRequest(
        lake=str(args.lake), model=args.model, subset=subset_name, policy=args.policy,
        weights=args.weights, img_size=args.img_size, run=args.run, outlier_ref=args.outlier_ref,
        normals_per_image=args.normals_per_image, keep_if_outlier=args.keep_if_outlier, n=args.n,
        blocks=args.blocks == "all", batch_size=args.batch_size, shard_size=args.shard_size,
        device=args.device, decode_workers=args.decode_workers, workers=args.workers,
        executor=args.executor, slurm=_slurm_options(args), quiet=args.quiet,
        record_mlp=args.record_mlp, mlp_acts=args.mlp_acts,
        test_time_registers=args.test_time_registers,
        decoder=args.decoder, preprocess=args.preprocess, precision=args.precision,
    )
    manifest = run_extraction(request, log=lambda text: _say(args, text))
    totals = manifest
    banner = " [RANDOM WEIGHTS]" if manifest["random_weights"] else ""
    print(f"run {manifest['run']}{banner}: {totals.get('n_images', '?')} images, "
          f"{totals.get('n_errors', 0)} errors, {totals.get('n_rejected', 0)} rejected, "
          f"{totals.get('n_tokens', '?')} tokens in {manifest['wall_time_s']:.1f} s")
    return 0


def pixels(args: argparse.Namespace) -> int:
    from tokenlake.extract import resolve_model
    from tokenlake.extract._models import meta_backbone
    from tokenlake.extract._pixelstore import build_pixel_store
    from tokenlake.extract._preprocess import data_config

    if args.device and args.decoder == "pil":
        raise ValueError("--device goes with --decoder torchvision (PIL decodes on the CPU cores)")
    spec = resolve_model(args.model)
    px = args.img_size or spec.img_size
    model = meta_backbone(spec, px)  # only the model's preprocessing recipe is needed
    cfg = data_config(model, img_size=px, preprocess=args.preprocess)
    built = build_pixel_store(str(args.lake), args.subset, cfg,
                              shard_size=args.shard_size, workers=args.workers, quiet=args.quiet,
                              decoder=args.decoder, device=args.device)
    also = "" if args.decoder == "pil" else f" with --decoder {args.decoder}"
    print(f"pixel store {built.name}: complete ({built.dir}); every extraction of subset "
          f"{args.subset} with this recipe{also} now reads it")
    return 0


def neurons(args: argparse.Namespace) -> int:
    from tokenlake.analyze._neurons import rank_neurons

    sparsity = None if args.sparsity_filter is None else args.sparsity_filter == "on"
    res = rank_neurons(args.lake, args.run, method=args.method, detect_block=args.detect_block,
                       highest_block=args.highest_block, sparsity_filter=sparsity,
                       sparsity_frac=args.sparsity_frac, top=args.top, out=args.out)
    meta = res["meta"]
    print(f"neurons of run {args.run} ({meta['method']}): outliers at block "
          f"{meta['detect_block']} ({meta['detect_block_rule']}), {res['n_outlier']} outlier / "
          f"{res['n_normal']} normal patch tokens in {res['n_images']} images with outliers; "
          f"candidates: blocks <= {meta['highest_block']}; sparsity filter "
          f"{'on' if meta['sparsity_filter'] else 'off'} -> {res['path']} (figure {res['figure']})")
    cols = ["rank", "block", "neuron", "score", "mean_abs_outlier", "mean_abs_normal",
            "outlier_share", "sparse_share"]
    _print_table(res["table"].select(cols).slice(0, args.top), max_rows=args.top)
    return 0


def _print_table(table, *, max_rows: int) -> None:
    frame = pl.from_arrow(table)
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160,
                   tbl_hide_dataframe_shape=False):
        print(frame)


def sql(args: argparse.Namespace) -> int:
    if args.list:
        print("views:", ", ".join(view_names()))
        from tokenlake.sql import query_names
        print("named queries:", ", ".join(query_names()))
        return 0
    sources = [x for x in (args.query, args.file, args.query_name) if x]
    if len(sources) != 1:
        raise ValueError("give exactly one of: a query, --file, --query-name")
    text = (args.file.read_text() if args.file else
            query_text(args.query_name) if args.query_name else args.query)
    table = store.open_lake(args.lake).sql(text)
    if args.format == "table":
        _print_table(table, max_rows=args.max_rows)
        return 0
    text = store.export_table(table, args.output, format=args.format)
    if text is not None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cards(args: argparse.Namespace) -> int:
    from tokenlake.analyze._cards import card_table, side_by_side

    if not args.lake.is_dir():
        raise store.LakeError(f"no lake at {args.lake}")
    if args.output is not None and args.format == "table":
        raise ValueError("--output goes with --format csv or json")
    table = card_table(store.open_lake(args.lake), runs=args.runs)
    if args.format != "table":
        text = store.export_table(table, args.output, format=args.format)
        if text is not None:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    head, rows = side_by_side(table)
    frame = pl.DataFrame([[r[k] for r in rows] for k in range(len(head))], schema=head,
                         orient="col")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=10_000,
                   tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_cell_alignment="LEFT"):
        print(frame)
    if any(r["random_weights"] for r in table.to_pylist()):
        print("[RANDOM WEIGHTS] runs used untrained networks: their cards say nothing about the "
              "real models.")
    print("Definitions: sql/views/cards.sql (`tokenlake sql --lake LAKE \"SELECT * FROM cards\"`).")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def runs(args: argparse.Namespace) -> int:
    rows = store.open_lake(args.lake).runs(include_incomplete=True)
    if not rows:
        print(f"no runs in {args.lake}")
        return 0
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}}  {'status':<8} {'shards':>9} {'images':>8} {'errors':>6} "
          f"{'tokens':>11} {'size':>9}  model")
    for r in rows:
        shards = f"{r['shards_committed']}/{r['shards_total'] or '?'}"
        model = f"{r.get('model') or '?'}" + ("  [RANDOM WEIGHTS]" if r.get("random_weights") else "")
        print(f"{r['run']:<{width}}  {r['status']:<8} {shards:>9} {r['n_images']:>8} "
              f"{r['n_errors']:>6} {r['n_tokens']:>11} {_size(r['bytes']):>9}  {model}")
    if any(r.get("random_weights") for r in rows):
        print("\n[RANDOM WEIGHTS] runs used untrained networks: their numbers say nothing about the "
              "real models.")
    return 0


def validate(args: argparse.Namespace) -> int:
    problems = store.open_lake(args.lake).validate(args.run)
    for problem in problems:
        print(problem)
    print("ok: every committed shard matches its marker" if not problems
          else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def plan(args: argparse.Namespace) -> int:
    from tokenlake.cli import _experiments

    exp = _experiments.load(args.file)
    lake = store.open_lake(args.lake) if args.lake and args.lake.exists() else None
    rates = _experiments.load_rates(args.rates) if args.rates else None
    _experiments.print_plan(exp, lake, rates)
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from tokenlake.cli import _experiments

    exp = _experiments.load(args.file)
    return _experiments.execute(exp, lake=args.lake, device=args.device, quiet=args.quiet,
                                log=lambda text: _say(args, text))


def demo(args: argparse.Namespace) -> int:
    from tokenlake.cli._demo import run_demo

    return run_demo(out=args.out, n_images=args.images)


def models(args: argparse.Namespace) -> int:
    from tokenlake.cli._models_cmd import describe

    print(describe(args.family))
    return 0
