"""Sub-command bodies: argument handling and printing only; the work lives in the packages, called
through their public API (tokenlake.extract, .store, .sql, .analyze).

Every import beyond the standard library happens inside the command that needs it: `sql`,
`runs`, `validate` and `cards` load DuckDB, pyarrow (and polars to print) but never a backbone
library, and `--help` loads none of them.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

from tokenlake.cli._errors import CommandError, os_error_line
from tokenlake.cli._options import comma_list


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _need_lake(args: argparse.Namespace) -> Path:
    if args.lake is None:
        raise CommandError("--lake DIR is required (or set TOKENLAKE_LAKE)")
    return args.lake


# -- writing results -------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Write a command's output file; a failure (permission, full disk, long name) names the file
    and becomes one line."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
    except OSError as err:
        raise CommandError(f"cannot write {os_error_line(err, path)}") from None


def write_parquet(path: Path, table) -> None:
    """Parquet through a handle this process opened: on an error pyarrow would delete a path it
    opened itself, whatever it is (a device file, for root)."""
    import pyarrow.parquet as pq

    try:
        with open(path, "wb") as handle:
            pq.write_table(table, handle)
    except OSError as err:
        raise CommandError(f"cannot write {os_error_line(err, path)}") from None


def emit(table, *, fmt: str, output: Path | None, text_table) -> None:
    """`table` (pyarrow) in `fmt`; to `output` when given (every format), else stdout.
    `text_table()` renders --format table."""
    if fmt == "parquet":
        if output is None:
            raise CommandError("--format parquet needs --output FILE")
        write_parquet(output, table)
        return
    if fmt == "table":
        text = text_table()
    else:
        from tokenlake.store import export_table

        text = export_table(table, None, format=fmt)
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        write_text(output, text)


def table_text(table, *, max_rows: int) -> str:
    import polars as pl

    frame = pl.from_arrow(table)
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160,
                   tbl_hide_dataframe_shape=False):
        return str(frame)


# -- extraction ------------------------------------------------------------------------------


def subset(args: argparse.Namespace) -> int:
    from tokenlake import store
    from tokenlake.extract import draw_subset, open_source

    source = open_source(args.data, split=args.split)
    table = draw_subset(source, n=args.n, seed=args.seed, limit=args.limit)
    path = store.write_subset(args.lake, args.name, table)
    print(f"subset {args.name}: {table.num_rows} of {source.num_rows} images from {args.data}"
          f"{'' if args.split is None else f' [{args.split}]'} (seed {args.seed}) -> {path}")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(text.rstrip("/")).name or text).strip("_").lower()


def adhoc_subset_name(data: str, *, split: str | None, limit: int | None) -> str:
    """The throwaway subset's name: the source's folder name for reading, then a digest of the
    source itself (its absolute path, or the dataset name), the split and the limit, so two
    folders with one basename never share a subset (subsets are write-once)."""
    local = Path(data).expanduser()
    source = str(local.resolve()) if local.exists() else data
    digest = hashlib.sha256(f"{source}\0{split or ''}\0{limit or ''}".encode()).hexdigest()[:10]
    return f"{_slug(data) or 'data'}-{'first' + str(limit) if limit else 'all'}-{digest}"


def _adhoc_subset(args: argparse.Namespace) -> str:
    """--data without --subset: a throwaway subset of the first N images, kept for provenance.
    The same source again gives the same subset (a no-op); a source whose first N images
    changed since is refused by write_subset (runs made from the old subset record it)."""
    from tokenlake import store
    from tokenlake.extract import draw_subset, open_source

    source = open_source(args.data, split=args.split)
    table = draw_subset(source, n=None, limit=args.limit)
    name = adhoc_subset_name(args.data, split=args.split, limit=args.limit)
    path = Path(args.lake) / "subsets" / f"{name}.parquet"
    try:
        store.write_subset(args.lake, name, table)
    except store.LakeError:
        if not path.exists():
            raise
        which = f"first {args.limit} images" if args.limit else "images"
        raise CommandError(
            f"--data {args.data}: its {which} changed since subset {name!r} was drawn from "
            "them, and runs made from that subset "
            f"record its checksum. Draw a named subset (`tokenlake subset --lake {args.lake} "
            f"--name NEW --data {args.data}{f' --limit {args.limit}' if args.limit else ''}`) "
            f"and extract with --subset NEW, or delete {path} if no run uses it") from None
    return name


def _slurm_options(args: argparse.Namespace) -> dict:
    """ExtractRequest.slurm from the --slurm-* flags given (the others keep their defaults)."""
    opts = {"partition": args.slurm_partition, "gpus": args.slurm_gpus, "cpus": args.slurm_cpus,
            "time": args.slurm_time, "array_parallelism": args.slurm_array_parallelism}
    return {k: v for k, v in opts.items() if v is not None}


def extract(args: argparse.Namespace) -> int:
    from tokenlake.extract import ExtractRequest
    from tokenlake.extract import extract as run_extraction

    if args.subset and args.limit:
        raise CommandError("--limit goes with --data; make a smaller subset with "
                           "`tokenlake subset`")
    subset_name = args.subset or _adhoc_subset(args)
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
        allow_version_change=args.allow_version_change,
    )
    manifest = run_extraction(request, log=lambda text: _say(args, text))
    banner = " [RANDOM WEIGHTS]" if manifest["random_weights"] else ""
    print(f"run {manifest['run']}{banner}: {manifest.get('n_images', '?')} images, "
          f"{manifest.get('n_errors', 0)} errors, {manifest.get('n_rejected', 0)} rejected, "
          f"{manifest.get('n_tokens', '?')} tokens in {manifest['wall_time_s']:.1f} s")
    return 0


def pixels(args: argparse.Namespace) -> int:
    from tokenlake.extract import build_pixels

    if args.device and args.decoder == "pil":
        raise CommandError("--device goes with --decoder torchvision (PIL decodes on the CPU "
                           "cores)")
    built = build_pixels(str(args.lake), args.subset, args.model, img_size=args.img_size,
                         preprocess=args.preprocess, decoder=args.decoder, device=args.device,
                         decode_workers=args.decode_workers, shard_size=args.shard_size,
                         quiet=args.quiet)
    also = "" if args.decoder == "pil" else f" with --decoder {args.decoder}"
    print(f"pixel store {built.name}: complete ({built.dir}); every extraction of subset "
          f"{args.subset} with this recipe{also} now reads it")
    return 0


def neurons(args: argparse.Namespace) -> int:
    from tokenlake.analyze import rank_neurons

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
    print(table_text(res["table"].select(cols).slice(0, args.top), max_rows=args.top))
    return 0


# -- reading the lake ------------------------------------------------------------------------


def _sql_list() -> str:
    from tokenlake.sql import BASE_VIEWS, query_info, query_names, view_info, view_names

    out = [("Base views (one row per token, image, error... of every complete run; "
            "store/SCHEMA.md):"), "  " + ", ".join(BASE_VIEWS), "",
           "Views (SELECT ... FROM NAME):"]
    infos = [view_info(n) for n in view_names()]
    width = max(len(i.name) for i in infos)
    for i in infos:
        out.append(f"  {i.name:<{width}}  {i.description}")
        if i.param_text and not i.param_text.startswith("none"):
            out.append(f"  {'':<{width}}  takes: {i.param_text}")
    out += ["", ("Named queries (tokenlake sql --query NAME --param NAME=VALUE ...; lists "
                 "comma-separated):")]
    queries = [query_info(n) for n in query_names()]
    width = max(len(i.name) for i in queries)
    for i in queries:
        out.append(f"  {i.name:<{width}}  {i.description}")
        params = "  ".join(f"--param {p.usage()}" for p in i.params) or "no parameters"
        out.append(f"  {'':<{width}}    {params}")
    out += ["", "Definitions: the header of each file in tokenlake/sql/views and sql/queries."]
    return "\n".join(out)


def _named_params(args: argparse.Namespace) -> list:
    from tokenlake.sql import bind_params, query_info

    info = query_info(args.query_name)
    by_name = {p.name: p for p in info.params}
    values = {}
    for item in args.param or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CommandError(f"--param {item!r}: write NAME=VALUE (e.g. --param runs=a,b)")
        if name in values:
            raise CommandError(f"--param {name} is given twice")
        values[name] = by_name[name].parse(text) if name in by_name else text
    return bind_params(args.query_name, values)  # unknown or missing names: one error


def sql(args: argparse.Namespace) -> int:
    if args.list:
        text = _sql_list()
        if args.output is None:
            print(text)
        else:
            write_text(args.output, text)
        return 0
    sources = [x for x in (args.text, args.file, args.query_name) if x]
    if len(sources) != 1:
        raise CommandError("give exactly one of: SQL text, --file FILE, --query NAME "
                           "(`tokenlake sql --list` shows the names)")
    if args.param and not args.query_name:
        raise CommandError("--param goes with --query NAME (a named query's parameters)")
    from tokenlake import store
    from tokenlake.sql import query_text

    params = None
    if args.query_name:
        text = query_text(args.query_name)
        params = _named_params(args)
    elif args.file:
        try:
            text = args.file.read_text(encoding="utf-8")
        except OSError as err:
            raise CommandError(f"cannot read {os_error_line(err, args.file)}") from None
    else:
        text = args.text
    table = store.open_lake(_need_lake(args)).sql(text, params=params)
    emit(table, fmt=args.format, output=args.output,
         text_table=lambda: table_text(table, max_rows=args.max_rows))
    return 0


def cards(args: argparse.Namespace) -> int:
    from tokenlake import analyze, store

    lake = _need_lake(args)
    table = analyze.card_table(store.open_lake(lake), runs=args.runs)
    emit(table, fmt=args.format, output=args.output, text_table=lambda: _cards_text(table))
    return 0


def _cards_text(table) -> str:
    import polars as pl

    from tokenlake.analyze import side_by_side

    head, rows = side_by_side(table)
    frame = pl.DataFrame([[r[k] for r in rows] for k in range(len(head))], schema=head,
                         orient="col")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=10_000,
                   tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_cell_alignment="LEFT"):
        lines = [str(frame)]
    if any(r["random_weights"] for r in table.to_pylist()):
        lines.append("[RANDOM WEIGHTS] runs used untrained networks: their cards say nothing "
                     "about the real models.")
    lines.append("Definitions: sql/views/cards.sql "
                 "(`tokenlake sql --lake LAKE \"SELECT * FROM cards\"`).")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def runs(args: argparse.Namespace) -> int:
    from tokenlake import store

    rows = store.open_lake(_need_lake(args)).runs(include_incomplete=True)
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
    from tokenlake import store

    lake = store.open_lake(_need_lake(args))
    names = comma_list(args.runs) if args.runs else [None]
    known = [r["run"] for r in lake.runs(include_incomplete=True)]
    for name in names:
        if name is not None and name not in known:  # a typo, not a damaged run
            raise store.UnknownRun(name, known)
    quick = getattr(args, "quick", False)
    # no run at all (an empty or non-lake folder): LakeError, one line, exit 2
    problems = [p for name in names for p in lake.validate(name, quick=quick)]
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)")
    elif quick:
        print("ok (quick: sizes, markers, manifests; nothing re-hashed): every committed shard's "
              "files and chunks are present with their marker's sizes")
    else:
        print("ok: every committed shard matches its marker")
    return 1 if problems else 0


# -- experiments, the demo, the model list ---------------------------------------------------


def experiment_file(arg: str) -> Path:
    """The experiment file `arg` names (a path, or a shipped experiment: `paper`); says so on
    stderr when it is the shipped copy."""
    from tokenlake.experiments import resolve_experiment

    path = resolve_experiment(arg)
    if path != Path(arg):
        print(f"experiment {arg}: {path} (shipped with tokenlake)", file=sys.stderr)
    return path


def plan(args: argparse.Namespace) -> int:
    from tokenlake import store
    from tokenlake.cli import _experiments

    exp = _experiments.load(experiment_file(args.file))
    lake = store.open_lake(args.lake) if args.lake and args.lake.exists() else None
    rates = _experiments.load_rates(args.rates) if args.rates else None
    _experiments.print_plan(exp, lake, rates)
    return 0


def demo(args: argparse.Namespace) -> int:
    from tokenlake.cli._demo import run_demo

    return run_demo(out=args.out, n_images=args.n)


def models(args: argparse.Namespace) -> int:
    from tokenlake.cli._models_cmd import describe

    print(describe(args.family))
    return 0
