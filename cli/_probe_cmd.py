"""`tokenlake probe NAME --lake LAKE --run RUN ...`: the linear probes of tokenlake.probes.

Wiring (cli/main.py): `from tokenlake.cli import _probe_cmd` then `_probe_cmd.register(sub)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenlake.cli._options import add_lake

NAMES = ("position", "reconstruct", "classify", "heads", "registers", "sweep")
TOKENS = ("post", "pre")  # = tokenlake.probes._data.TOKENS (not imported: --help stays light)
TARGETS = ("aligned", "centred")  # = tokenlake.probes._cells.TARGETS
DEFAULT_SEED = 42  # the paper: "All experiments use a random seed of 42"
# which probes take which of the per-probe options
_OPTIONS = {"test_run": ("classify",), "train_run": ("registers",),
            "tokens": ("position", "reconstruct", "classify", "sweep"), "target": ("reconstruct",)}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe", help="linear probes on the lake: position | reconstruct | classify | heads | "
                      "registers | sweep (paper Tables 1-5, Figure 11)",
        description="Train (or reuse) a linear probe on a run's cached tokens. Probes read the "
                    "model's output tokens (after the final norm; --tokens pre for the stored "
                    "ones) and judge outliers by the pre-norm norm. Results go to "
                    "LAKE/probes/<run>/<probe>-<hash>/ and the probe_results SQL view. "
                    "Hyper-parameters left unset take the probe's recorded defaults "
                    "(probes/README.md). Table 3 on validation images: "
                    "`probe classify --run M-train200k --test-run M-val5k`.",
    )
    p.add_argument("name", choices=NAMES, metavar="NAME", help=" | ".join(NAMES))
    add_lake(p)
    p.add_argument("--run", default=None,
                   help="the run to probe (classify: the training run)")
    p.add_argument("--head", type=Path, default=None,
                   help="heads/registers: local DINOv2 linear head .pth "
                        "(dinov2_vit{s,b,l,g}14[_reg4]_linear_head.pth)")
    p.add_argument("--run-without", default=None,
                   help="heads: run of the model without registers (with --head-without)")
    p.add_argument("--head-without", type=Path, default=None)
    p.add_argument("--run-with-registers", default=None,
                   help="heads: run of the model with registers (with --head-with-registers)")
    p.add_argument("--head-with-registers", type=Path, default=None)
    p.add_argument("--train-run", default=None,
                   help="registers: train/val on this run, test on --run (default: split --run)")
    p.add_argument("--test-run", default=None,
                   help="classify: test on this run's images (the model's validation-image run, "
                        "e.g. dinov2_s-518-val5k); train on --run, early-stop on a held-out "
                        "part of it. Must be the same model (timm_name, weights, img_size, "
                        "preprocess) and share no image. Outliers in it are judged by --run's "
                        "threshold. Default: split --run train/val/test (its own images)")
    p.add_argument("--tokens", choices=TOKENS, default=None,
                   help="position/reconstruct/classify/sweep: the embeddings read - post: the "
                        "model's output tokens (the run's saved final norm applied; default, as "
                        "the paper), pre: the stored tokens before the final norm. Outliers are "
                        "always judged by the pre-norm norm. heads/registers read post-norm "
                        "image arrays")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="reconstruct: aligned (default) - the pixels under the token's grid "
                        "cell; centred - the cell centred on its receptive field (PVT: half a "
                        "cell up-left; the same cell for ViT/Swin)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--force", action="store_true", help="retrain even if a result exists")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"default {DEFAULT_SEED}, as the paper")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    g = p.add_argument_group("hyper-parameters (default: the probe's, see probes/README.md)")
    g.add_argument("--lrs", type=_floats, default=None, help="comma-separated lr grid")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--max-epochs", type=int, default=None)
    g.add_argument("--patience", type=int, default=None, help="not for registers (fixed epochs)")
    g.add_argument("--val-fraction", type=float, default=None)
    g.add_argument("--test-fraction", type=float, default=None)
    g.add_argument("--max-train-tokens", type=int, default=None,
                   help="position/reconstruct/sweep: seeded cap on training tokens")
    g.add_argument("--mse-weight", type=float, default=None, help="position/sweep (0.5)")
    g.add_argument("--tops", type=_floats, default=None,
                   help="sweep: top-%% levels, default 50,40,30,20,10,5,2")
    p.set_defaults(func=run)
    return p


_HP = ("lrs", "batch_size", "weight_decay", "max_epochs", "patience", "val_fraction",
       "test_fraction", "max_train_tokens", "mse_weight")


def _hp(args, allowed) -> dict:
    out = {}
    for k in _HP:
        v = getattr(args, k)
        if v is None:
            continue
        if k not in allowed:
            raise ValueError(f"--{k.replace('_', '-')} does not apply to probe {args.name}")
        out[k] = v
    return out


def _print(args, result) -> None:
    from tokenlake.probes import format_result

    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1,
                         default=str))
        return
    state = "reused" if result.get("reused") else "trained"
    print(f"# {result['probe']} {result['run']} [{result['config_hash']}] ({state}) "
          f"-> {result['path']}")
    print(format_result(result))


def _options(args) -> dict:
    """The per-probe options given; one given to a probe that does not take it is an error."""
    out = {}
    for k, probes_ in _OPTIONS.items():
        v = getattr(args, k)
        if v is None:
            continue
        if args.name not in probes_:
            raise ValueError(f"--{k.replace('_', '-')} does not apply to probe {args.name} "
                             f"(only {', '.join(probes_)})")
        out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    from tokenlake import probes

    common = {"device": args.device, "force": args.force, "seed": args.seed, "quiet": args.quiet}
    name = args.name
    opts = _options(args)
    if name == "heads":
        pairs = []
        if args.run or args.head:
            if not (args.run and args.head):
                raise ValueError("heads needs --run with --head")
            pairs.append(("run", args.run, args.head))
        for label, r, h in (("without registers", args.run_without, args.head_without),
                            ("with registers", args.run_with_registers, args.head_with_registers)):
            if r or h:
                if not (r and h):
                    raise ValueError(f"heads {label}: give both the run and its head")
                pairs.append((label, r, h))
        if not pairs:
            raise ValueError("heads needs --run/--head, or --run-without/--head-without and/or "
                             "--run-with-registers/--head-with-registers")
        _hp(args, ())
        for label, r, h in pairs:
            res = probes.heads(args.lake, r, h, **common)
            if len(pairs) > 1:
                print(f"## {label}")
            _print(args, res)
        return 0
    if not args.run:
        raise ValueError(f"probe {name} needs --run")
    if name == "position":
        res = probes.position(args.lake, args.run, **common, **opts,
                              **_hp(args, probes.DEFAULTS["position"]))
    elif name == "reconstruct":
        res = probes.reconstruct(args.lake, args.run, **common, **opts,
                                 **_hp(args, probes.DEFAULTS["reconstruct"]))
    elif name == "classify":
        res = probes.classify(args.lake, args.run, **common, **opts,
                              **_hp(args, probes.DEFAULTS["classify"]))
    elif name == "registers":
        res = probes.registers(args.lake, args.run, head=args.head, **common, **opts,
                               **_hp(args, probes.DEFAULTS["registers"]))
    else:
        extra = {"tops": args.tops} if args.tops else {}
        res = probes.sweep(args.lake, args.run, **common, **extra, **opts,
                           **_hp(args, probes.DEFAULTS["sweep"]))
    _print(args, res)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`tokenlake probe ...` as the command line runs it (argv starts with "probe")."""
    from tokenlake.cli.main import main as cli_main

    return cli_main(argv)
