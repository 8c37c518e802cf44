"""The ``tokenlake`` command line: ``main(argv) -> int``, one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenlake.cli import _analyze_cmd, _commands, _probe_cmd
from tokenlake.extract._preprocess import PREPROCESS
from tokenlake.extract._tvdecode import DECODERS


def _lake(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lake", required=True, type=Path, help="the lake's root directory")


def _quiet_libraries() -> None:
    """datasets prints a bar per local folder it indexes; our own bars say what matters."""
    import datasets

    datasets.disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenlake",
        description="Run each vision backbone once; answer every later question from the lake.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("subset", help="choose which images a subset holds (seeded)")
    _lake(p)
    p.add_argument("--name", required=True, help="subset name, e.g. val5k")
    p.add_argument("--data", required=True,
                   help="Hugging Face dataset name, local image folder, or save_to_disk directory")
    p.add_argument("--split", default=None, help="dataset split (e.g. validation)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: all)")
    p.add_argument("--seed", type=int, default=42)
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
    p.add_argument("--normals-per-image", type=int, default=4)
    p.add_argument("--keep-if-outlier", action="store_true",
                   help="keep only images with >= 1 outlier token, until --n are kept")
    p.add_argument("--n", type=int, default=None, help="with --keep-if-outlier: images to keep")
    p.add_argument("--blocks", choices=["none", "all"], default="none",
                   help="'all' also records every block's output norm and q/k/v norms")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="images per shard")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="decoding processes per extraction process (default: cores - 1, max 8); "
                        "unused when a pixel store feeds the run (read by threads)")
    p.add_argument("--workers", type=int, default=1,
                   help="extraction processes, each owning whole shards (one per GPU)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="'slurm' submits the shards as a SLURM job array through submitit")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per SLURM task")
    p.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per SLURM task")
    p.add_argument("--slurm-time", type=int, default=240, help="time limit per task, minutes")
    p.add_argument("--slurm-array-parallelism", type=int, default=None,
                   help="SLURM tasks running at once (default: all)")
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
                   help="dtype the blocks run in: fp32, or bf16 autocast (default: bf16 on a "
                        "GPU, fp32 on the CPU); recorded as the run's compute_dtype")
    p.add_argument("--quiet", action="store_true")
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
    p.add_argument("--out", type=Path, default=None, help="figure folder (default LAKE/analysis)")
    p.set_defaults(func=_commands.neurons)

    p = sub.add_parser("pixels", help="decode a subset once into the lake's pixel store, which "
                                      "every model with the same input recipe then reads")
    _lake(p)
    p.add_argument("--subset", required=True)
    p.add_argument("--model", required=True, help="whose resize recipe (size, crop, interpolation)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (pil, default: all cores) or file-reading threads "
                        "(torchvision, default: all cores up to 16)")
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_commands.pixels)

    p = sub.add_parser("sql", help="ask a read-only SQL question of the lake (DuckDB)")
    _lake(p)
    p.add_argument("query", nargs="?", help="SQL text; or use --file / --query-name")
    p.add_argument("--file", type=Path, help="read the query from a file")
    p.add_argument("--query-name", help="a named query shipped in tokenlake.sql (see --list)")
    p.add_argument("--list", action="store_true", help="list views and named queries")
    p.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"])
    p.add_argument("--output", type=Path, help="write the result here (required for parquet)")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table")
    p.set_defaults(func=_commands.sql)

    p = sub.add_parser("cards", help="the outlier card of each run, side by side: threshold, "
                                     "affected images, max/median norm, bimodality, emergence "
                                     "block, attention agreement, low-info share, register neurons")
    _lake(p)
    p.add_argument("--runs", default=None, help="comma list of runs (default: every complete run)")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"],
                   help="table: one column per run, one row per card field; csv, json: one "
                        "record per run with the `cards` view's typed columns plus family, params")
    p.add_argument("--output", type=Path, default=None, help="csv/json: write to this file")
    p.set_defaults(func=_commands.cards)

    p = sub.add_parser("runs", help="what is in the lake, with sizes and status")
    _lake(p)
    p.set_defaults(func=_commands.runs)

    p = sub.add_parser("validate", help="check every committed shard against its marker")
    _lake(p)
    p.add_argument("--run", default=None)
    p.set_defaults(func=_commands.validate)

    p = sub.add_parser("models", help="the model families tokenlake extracts from (timm classes, "
                                      "attention, options, traps) and every alias with its tag, "
                                      "native resolution and token layout")
    p.add_argument("--family", default=None, help="only this family (vit, swin, pvt, siglip, ...)")
    p.set_defaults(func=_commands.models)

    _analyze_cmd.register(sub)
    _probe_cmd.register(sub)

    p = sub.add_parser("plan", help="print an experiment file's runs with GPU time and disk")
    p.add_argument("file", type=Path, help="e.g. experiments/paper.toml")
    p.add_argument("--lake", type=Path, default=None, help="mark what this lake already holds")
    p.add_argument("--rates", type=Path, default=None,
                   help="GPU rates from this bench results file (bench/run.py --only gpu); "
                        "default docs/bench-results-gpu.json if present, else docs/MODELS.md's")
    p.set_defaults(func=_commands.plan)

    p = sub.add_parser("run", help="execute an experiment file, skipping what the lake holds")
    p.add_argument("file", type=Path)
    _lake(p)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_commands.run_experiment)

    p = sub.add_parser("demo", help="build the demo image set, extract two random-weight models, "
                                    "and print a few SQL answers")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where the lake goes")
    p.add_argument("--images", type=int, default=64, help="demo images to use")
    p.set_defaults(func=_commands.demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except _commands.USER_ERRORS as err:
        print(f"tokenlake {args.command}: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
