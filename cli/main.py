"""The ``tokenlake`` command line: ``main(argv) -> int``, one sub-command per job.

Building the parser imports the standard library only, so `--help` answers at once; each command
imports what it needs when it runs (tests/test_cli.py holds `sql`, `runs`, `validate`, `cards` and
`--help` free of torch, timm, torchvision and datasets). Errors a user can cause print one line
and exit 2 (cli/_errors.py); a command whose extra is not installed says which to install.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenlake.cli import _analyze_cmd, _commands, _probe_cmd, _run_cmd
from tokenlake.cli._errors import CommandError, missing_extra, user_error_line
from tokenlake.cli._options import (
    DECODERS,
    PREPROCESS,
    Parser,
    add_lake,
    add_version,
    deprecated,
)

_lake = add_lake  # `--lake DIR`, default $TOKENLAKE_LAKE


def _quiet_libraries(command: str) -> None:
    """datasets prints a bar per folder or file it indexes; our own bars say what matters. Set
    through its environment variable, read when (and if) datasets is imported: an image folder
    never imports it (0.5 s with pandas and scipy), so the CLI must not either."""
    if command in ("subset", "extract", "pixels", "run", "demo"):
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tokenlake",
        description="Run each vision backbone once; answer every later question from the lake.",
        epilog="--lake defaults to $TOKENLAKE_LAKE. `tokenlake COMMAND --help` for a command's "
               "options. `pip install tokenlake` reads lakes (sql, runs, validate, cards, "
               "analyze, report, neurons); extract, subset, pixels, models, plan, run need "
               "tokenlake[extract], probe tokenlake[probes], demo tokenlake[demo].",
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("subset", help="choose which images a subset holds (seeded)")
    _lake(p)
    p.add_argument("--name", required=True, help="subset name, e.g. val5k")
    p.add_argument("--data", required=True,
                   help="Hugging Face dataset name, local image folder, or save_to_disk directory")
    p.add_argument("--split", default=None, help="dataset split (e.g. validation)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the draw")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N drawn images")
    p.set_defaults(func=_commands.subset)

    p = sub.add_parser("extract", help="run a backbone over a subset into the lake (resumable)")
    _lake(p)
    p.add_argument("--model", required=True, help="alias (dinov2_g_reg4, pvt_b2, ...) or timm name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--subset", help="a subset made by `tokenlake subset`")
    src.add_argument("--data", help="images to use directly (a throwaway subset of the first N)")
    p.add_argument("--split", default=None, help="with --data: the dataset split")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--policy", default="all", choices=["all", "sample", "summary"],
                   help="which tokens keep embeddings: all | sample | summary")
    p.add_argument("--weights", default="pretrained",
                   help="'pretrained' (timm hub), a local weights file, or 'random' (tests, demo)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: paper's)")
    p.add_argument("--run", default=None, help="run name (default: MODEL-PX-SUBSET)")
    p.add_argument("--outlier-ref", default=None,
                   help="run whose 98th-percentile patch norm is the outlier threshold")
    p.add_argument("--normals-per-image", type=int, default=4,
                   help="--policy sample: seeded random normal patches kept per image")
    p.add_argument("--keep-if-outlier", action="store_true",
                   help="keep only images with >= 1 outlier token, until --n are kept")
    p.add_argument("--n", type=int, default=None, help="with --keep-if-outlier: images to keep")
    p.add_argument("--blocks", choices=["none", "all"], default="none",
                   help="'all' also records every block's output norm and q/k/v norms")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="decoding processes per extraction process (default: cores - 1, max 8); "
                        "unused when a pixel store feeds the run (read by threads)")
    p.add_argument("--workers", type=int, default=1,
                   help="extraction processes, each owning whole shards (one per GPU)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="'slurm' submits the shards as a SLURM job array through submitit")
    p.add_argument("--slurm-partition", default=None, help="SLURM partition (default: the "
                                                           "cluster's)")
    p.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per SLURM task "
                                                                 "(default 1)")
    p.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per SLURM task (default 8)")
    p.add_argument("--slurm-time", default=None,
                   help="per task: minutes, H:MM:SS or D-H:MM:SS (default 240)")
    p.add_argument("--slurm-array-parallelism", type=int, default=None,
                   help="SLURM tasks running at once (default 16)")
    p.add_argument("--record-mlp", action="store_true",
                   help="ViTs: also store per-image register-neuron statistics (mlp_* arrays, "
                        "what `tokenlake neurons` ranks; ~11 MB per image for DINOv2-L at 518 px). "
                        "Needs --outlier-ref (its threshold decides outliers at every block); "
                        "implies --blocks all")
    p.add_argument("--mlp-acts", action="store_true",
                   help="with --record-mlp: also store every block's raw MLP activation at every "
                        "patch token (fp16 array mlp_acts, L x H x patches per image: ~270 MB for "
                        "DINOv2-L at 518 px; tiny subsets only)")
    p.add_argument("--test-time-registers", default=None, metavar="RUN:K",
                   help="ViTs: add one zero token (kind ttreg) and move RUN's top-K register "
                        "neurons' activations onto it (see `tokenlake neurons`); K=0 adds the token only")
    p.add_argument("--decoder", choices=DECODERS, default="pil",
                   help="whose decoded pixels: 'pil' (default; a PIL pixel store if built, else "
                        "decoded on the fly) or 'torchvision' (reads the subset's torchvision "
                        "pixel store, which `tokenlake pixels --decoder torchvision` builds)")
    p.add_argument("--preprocess", choices=PREPROCESS, default="model",
                   help="input recipe: 'model' (timm's eval resize/crop for the model) or "
                        "'dinov2-eval' (DINOv2's official linear evaluation: resize 256 bicubic, "
                        "centre crop 224, at --img-size 224)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="dtype the blocks run in: fp32 (TF32 off), or bf16 autocast (default: "
                        "bf16 on a GPU, fp32 on the CPU); norms, attention and cosines are "
                        "reduced in fp32 either way; recorded as the run's compute_dtype, and a "
                        "threshold (--outlier-ref) must come from a run of the same precision "
                        "and device type")
    p.add_argument("--allow-version-change", action="store_true",
                   help="resume a run begun with other versions of torch, timm or tokenlake "
                        "(refused otherwise, naming them); the change is recorded in the run's "
                        "manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(func=_commands.extract)

    p = sub.add_parser("neurons", help="rank the MLP neurons of a --record-mlp run as register "
                                       "neurons (Jiang et al. 2025; analyze/_neurons.py)")
    _lake(p)
    p.add_argument("--run", required=True, help="a run extracted with --record-mlp")
    p.add_argument("--method", choices=["jiang", "contrast"], default="jiang",
                   help="'jiang': mean |activation| at the detection block's outlier patches, "
                        "averaged over images, blocks up to --highest-block (their "
                        "find_register_neurons); 'contrast': mean activation at the last block's "
                        "outliers minus elsewhere, every block")
    p.add_argument("--detect-block", type=int, default=None,
                   help="block whose output norms (> the run's threshold) mark the outlier "
                        "positions; negative counts from the end (default: the first block whose "
                        "median norm at the final outliers exceeds the threshold)")
    p.add_argument("--highest-block", type=int, default=None,
                   help="only neurons of blocks up to this one are ranked (default: the detection "
                        "block; -1 = the last block, no limit)")
    p.add_argument("--sparsity-filter", choices=["on", "off"], default=None,
                   help="jiang: score an image's neuron only if >= --sparsity-frac of its patches "
                        "have activation < 0.5 (default on, as their notebook)")
    p.add_argument("--sparsity-frac", type=float, default=0.5,
                   help="the sparsity filter's share of patches (their sparsity_frac_threshold)")
    p.add_argument("--top", type=int, default=10, help="neurons printed and labelled in the figure")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder of the table and figure (default: LAKE/analysis)")
    p.set_defaults(func=_commands.neurons)

    p = sub.add_parser("pixels", help="decode a subset once into the lake's pixel store, which "
                                      "every model with the same input recipe then reads")
    _lake(p)
    p.add_argument("--subset", required=True, help="a subset made by `tokenlake subset`")
    p.add_argument("--model", required=True, help="whose resize recipe (size, crop, interpolation)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution (default: the model's, as extract)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="decoding processes (pil, default: all cores) or file-reading threads "
                        "(torchvision, default: all cores up to 16)")
    deprecated(p, "--workers", "--decode-workers", dest="decode_workers", type=int)
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per pixel-store shard (default: >= 4 shards per worker, at most "
                        "256; an unfinished store keeps its own)")
    p.add_argument("--decoder", choices=DECODERS, default="pil",
                   help="'pil' (every CPU core) or 'torchvision' (JPEGs decoded on --device, "
                        "e.g. nvjpeg on a GPU; other files by PIL): a separate store, since the "
                        "pixels differ by a few grey levels; extract with the same --decoder")
    p.add_argument("--device", default=None,
                   help="with --decoder torchvision: cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--preprocess", choices=PREPROCESS, default="model",
                   help="input recipe whose pixels to store (as extract --preprocess)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_commands.pixels)

    p = sub.add_parser(
        "sql", help="ask a read-only SQL question of the lake (DuckDB), or run a named query",
        description="One read-only statement over the lake's views (SQL text, --file or a named "
                    "query with --param). `tokenlake sql --list` shows every view and named "
                    "query with its parameters, and needs no lake.")
    add_lake(p, required=False, help="the lake's root directory (not needed with --list)")
    p.add_argument("text", nargs="?", metavar="SQL", help="SQL text (or --file / --query)")
    p.add_argument("--file", type=Path, help="read the SQL from this file")
    p.add_argument("--query", dest="query_name", metavar="NAME",
                   help="a named query shipped in tokenlake.sql (see --list)")
    deprecated(p, "--query-name", "--query", dest="query_name")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a named query's parameter, by the name its header gives (--list); "
                        "repeat for each; a list is comma-separated (--param runs=a,b)")
    p.add_argument("--list", action="store_true",
                   help="list the views and named queries with descriptions and parameters")
    p.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"],
                   help="table: printed rows (--max-rows); csv, json; parquet (needs --output)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="write the result (any --format, or --list) to this file instead of "
                        "stdout")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table")
    p.set_defaults(func=_commands.sql)

    p = sub.add_parser("cards", help="the outlier card of each run, side by side: threshold, "
                                     "affected images, max/median norm, bimodality, emergence "
                                     "block, attention agreement, low-info share, register neurons")
    _lake(p)
    p.add_argument("--runs", default=None, help="comma list of runs (default: every complete run)")
    p.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"],
                   help="table: one column per run, one row per card field; csv, json, parquet: "
                        "one record per run with the `cards` view's typed columns plus family, "
                        "params (parquet needs --output)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the cards (any --format) to this file instead of stdout")
    p.set_defaults(func=_commands.cards)

    p = sub.add_parser("runs", help="what is in the lake, with sizes and status")
    _lake(p)
    p.set_defaults(func=_commands.runs)

    p = sub.add_parser("validate", help="check every committed shard against its marker")
    _lake(p)
    p.add_argument("--runs", default=None,
                   help="comma list of runs to check (default: every run, partial ones too)")
    p.add_argument("--quick", action="store_true",
                   help="sizes, markers and manifests only, no re-hashing (routine use; the "
                        "default re-hashes every file)")
    deprecated(p, "--run", "--runs", dest="runs")
    p.set_defaults(func=_commands.validate)

    p = sub.add_parser("models", help="the model families tokenlake extracts from (timm classes, "
                                      "attention, options, traps) and every alias with its tag, "
                                      "native resolution and token layout")
    p.add_argument("--family", default=None, help="only this family (vit, swin, pvt, siglip, ...)")
    p.set_defaults(func=_commands.models)

    _analyze_cmd.register(sub)
    _probe_cmd.register(sub)

    p = sub.add_parser("plan", help="print an experiment's runs with GPU time and disk")
    p.add_argument("file", metavar="EXPERIMENT",
                   help="an experiment file, or the name of one shipped with tokenlake (paper, "
                        "beyond, demo; experiments/NAME.toml also names it)")
    add_lake(p, required=False, help="mark what this lake already holds")
    p.add_argument("--rates", type=Path, default=None,
                   help="GPU rates from this bench results file (bench/run.py --only gpu); "
                        "default: the project's committed GPU results if present, else the H200 "
                        "anchors of docs/MODELS.md")
    p.set_defaults(func=_commands.plan)

    _run_cmd.register(sub)  # run and status

    p = sub.add_parser("demo", help="build the demo image set, extract two random-weight models, "
                                    "and print a few SQL answers")
    p.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="output folder: images, lake and report go under it")
    p.add_argument("--n", type=int, default=64, help="demo images to make")
    deprecated(p, "--images", "--n", dest="n", type=int)
    p.set_defaults(func=_commands.demo)
    return parser


def _check_paths(args: argparse.Namespace) -> None:
    """A path naming the wrong kind of thing, before a command trips over it."""
    lake = getattr(args, "lake", None)
    if lake is not None and lake.exists() and not lake.is_dir():
        raise CommandError(f"--lake {lake} is a file, not a lake directory")
    out = getattr(args, "out", None)
    if isinstance(out, Path) and out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; --out names an output folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command
    try:
        _check_paths(args)
        if (why := missing_extra(command)) is not None:
            raise CommandError(why)
        _quiet_libraries(command)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"tokenlake {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`tokenlake sql ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:  # user errors become one line; the rest re-raise
        line = user_error_line(err, command)
        if line is None:
            raise
        print(f"tokenlake {command}: error: {line}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
