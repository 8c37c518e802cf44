"""An experiment file as a graph of steps, each a call of the public Python API.

Steps, in an order that puts every step after the steps it needs: pixel stores, then the runs
(a run after its `outlier_ref` run, a test-time-register run after the neuron ranking it reads,
each `--record-mlp` run followed by that ranking), then analyses, probes and the report. Each
step carries the command a user would type for the same work (logged, recorded), and an action
object (picklable: a cluster task runs it on another machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenlake.cli._entries import analysis_kwargs, argv, probe_calls, report_kwargs
from tokenlake.extract import ExtractRequest, commit_run, extract_here


@dataclass
class Step:
    id: str  # kind.name: pixels.<store>, extract.<run>, neurons.<run>, analyze.<i>.<name>, ...
    command: str  # the equivalent `tokenlake ...` command line
    action: object  # action(log=print) -> summary line: the whole step in one process
    needs: tuple[str, ...] = ()
    gpu: bool = False  # on a cluster: a task with GPUs
    request: ExtractRequest | None = None  # extraction steps: a cluster splits it into shards

    @property
    def kind(self) -> str:
        return self.id.partition(".")[0]


@dataclass(frozen=True)
class WholeRun:
    request: ExtractRequest

    def __call__(self, *, log=print) -> str:
        m = extract_here(self.request, log=log)
        return f"run {m['run']}: {m['n_images']} images"


@dataclass(frozen=True)
class CommitRun:
    request: ExtractRequest

    def __call__(self, *, log=print) -> str:
        m = commit_run(self.request, log=log)
        return f"run {m['run']}: {m['n_images']} images"


@dataclass(frozen=True)
class Pixels:
    lake: str
    subset: str
    cfg: object  # extract._preprocess.DataConfig
    decoder: str
    runs: int
    workers: int | None = None  # None: every core (a cluster task: its cpus)
    quiet: bool = False

    def __call__(self, *, log=print) -> str:
        from tokenlake.extract import build_pixel_store

        build_pixel_store(self.lake, self.subset, self.cfg, decoder=self.decoder,
                          workers=self.workers, quiet=self.quiet)
        return (f"pixel store for {self.subset} at {self.cfg.img_size} px: complete "
                f"({self.runs} runs)")


@dataclass(frozen=True)
class Neurons:
    lake: str
    run: str
    options: dict

    def __call__(self, *, log=print) -> str:
        from tokenlake.analyze import rank_neurons

        opts = dict(self.options)
        if isinstance(opts.get("sparsity_filter"), str):  # the command line's on | off
            opts["sparsity_filter"] = opts["sparsity_filter"] == "on"
        res = rank_neurons(self.lake, self.run, **opts)
        return f"neurons of run {self.run}: {res['path']}"


@dataclass(frozen=True)
class Analyze:
    lake: str
    entry: dict

    def __call__(self, *, log=print) -> str:
        from tokenlake import analyze

        failed, wrote = [], []
        for name, kwargs in analysis_kwargs(self.entry):
            try:  # as `tokenlake analyze all`: every job, then the errors together
                res = analyze.JOBS[name](self.lake, **kwargs)
            except ValueError as err:
                failed.append(f"{name}: {err}")
                continue
            wrote.append(name)
            for run, why in res.get("missing", {}).items():
                log(f"{name}: run {run}: {why}")
        if failed:
            raise ValueError("analysis failed: " + "; ".join(failed))
        return f"analyses {', '.join(wrote)}: done"


@dataclass(frozen=True)
class Probe:
    lake: str
    entry: dict
    device: str | None
    quiet: bool

    def __call__(self, *, log=print) -> str:
        from tokenlake import probes

        out = []
        for fn, args, kwargs in probe_calls(self.entry, device=self.device, quiet=self.quiet):
            res = getattr(probes, fn)(self.lake, *args, **kwargs)
            state = "reused" if res.get("reused") else "trained"
            log(f"# {res['probe']} {res['run']} [{res['config_hash']}] ({state}) -> {res['path']}")
            log(probes.format_result(res))
            out.append(f"{res['probe']} {res['run']} ({state})")
        return "probe " + "; ".join(out)


@dataclass(frozen=True)
class Report:
    lake: str
    options: dict

    def __call__(self, *, log=print) -> str:
        from tokenlake import analyze

        res = analyze.report(self.lake, **report_kwargs(self.options))
        for claim, verdict in res["claims"].items():
            log(f"  {claim}: {verdict}")
        if res["errors"]:  # a part of the report raised: a bug, not missing data
            raise RuntimeError(f"report {res['html']} was written, but {len(res['errors'])} of "
                               "its parts raised (its Errors section): " + "; ".join(
                                   f"{e['part']}: {e['error']}" for e in res["errors"]))
        return f"report: {res['html']}"


def request_for(run, *, lake: Path, device: str | None, quiet: bool, decoder: str,
                executor: str = "local", decode_workers: int | None = None) -> ExtractRequest:
    return ExtractRequest(
        decoder=decoder, lake=str(lake), model=run.model, subset=run.subset, policy=run.policy,
        weights=run.weights, img_size=run.img_size, run=run.name(), outlier_ref=run.outlier_ref,
        normals_per_image=run.normals_per_image, keep_if_outlier=run.keep_if_outlier, n=run.n,
        blocks=run.blocks == "all", record_mlp=run.record_mlp, mlp_acts=run.mlp_acts,
        test_time_registers=run.test_time_registers, preprocess=run.preprocess,
        precision=run.precision, batch_size=run.batch_size, shard_size=run.shard_size,
        device=device, quiet=quiet, executor=executor, decode_workers=decode_workers)


def _extract_command(run, request: ExtractRequest) -> str:
    flags = {"lake": request.lake, "model": run.model, "subset": run.subset,
             "policy": run.policy, "weights": run.weights, "img_size": run.img_size,
             "run": run.name(), "outlier_ref": run.outlier_ref,
             "normals_per_image": run.normals_per_image if run.policy == "sample" else None,
             "keep_if_outlier": run.keep_if_outlier, "n": run.n,
             "blocks": "all" if run.blocks == "all" else None, "record_mlp": run.record_mlp,
             "mlp_acts": run.mlp_acts, "test_time_registers": run.test_time_registers,
             "preprocess": None if run.preprocess == "model" else run.preprocess,
             "precision": run.precision, "decoder": None if request.decoder == "pil"
             else request.decoder, "batch_size": run.batch_size if run.batch_size != 32 else None,
             "shard_size": run.shard_size if run.shard_size != 256 else None,
             "device": request.device}
    return argv("extract", flags)


@dataclass
class _Refs:
    """Which step makes a run a step reads: one of the file's, or the lake's (nothing to wait
    for). `strict`: a run neither makes is refused before anything runs."""

    names: list[str]
    lake: Path
    strict: bool
    where: str

    def run(self, run: str, why: str) -> tuple[str, ...]:
        if run in self.names:
            return (f"extract.{run}",)
        if self.strict and not (self.lake / "runs" / run / "manifest.json").is_file():
            raise ValueError(f"{self.where}: {why} {run!r}, which is neither a run of the file "
                             f"nor a complete run of {self.lake}")
        return ()

    def neurons(self, source: str, why: str) -> tuple[str, ...]:
        if source in self.names:
            return (f"neurons.{source}",)
        if self.strict and not (self.lake / "neurons" / f"{source}.parquet").is_file():
            raise ValueError(f"{self.where}: {why} {source!r}, which is neither a record_mlp run "
                             f"of the file nor ranked in {self.lake}/neurons")
        return ()


def build(exp, *, lake: Path, device: str | None, quiet: bool, executor: str = "local",
          decode_workers: int | None = None, pixel_workers: int | None = None,
          strict: bool = True) -> list[Step]:
    """The file's steps in order; `strict`: refuses a reference to a run that neither the file
    makes nor the lake holds, before anything runs."""
    lake = Path(lake)
    refs = _Refs([r.name() for r in exp.runs], lake, strict, str(exp.path or "experiment"))
    steps, store_of = _pixel_steps(exp, lake, workers=pixel_workers, quiet=quiet)
    for run in exp.runs:
        name = run.name()
        request = request_for(run, lake=lake, device=device, quiet=quiet, executor=executor,
                              decoder=exp.pixels["decoder"] if name in store_of else "pil",
                              decode_workers=decode_workers)
        needs = (store_of[name],) if name in store_of else ()
        if run.outlier_ref:
            needs += refs.run(run.outlier_ref, f"run {name} names outlier_ref")
        if run.test_time_registers:
            needs += refs.neurons(run.test_time_registers.rpartition(":")[0],
                                  f"run {name} moves the register neurons of")
        steps.append(Step(f"extract.{name}", _extract_command(run, request), WholeRun(request),
                          needs, gpu=True, request=request))
        if run.record_mlp:  # rank its neurons now: a test-time-registers run may need them next
            flags = {"lake": str(lake), "run": name, **{  # the command line's on | off
                k: ("on" if v else "off") if isinstance(v, bool) else v
                for k, v in run.neurons.items()}}
            steps.append(Step(f"neurons.{name}", argv("neurons", flags),
                              Neurons(str(lake), name, dict(run.neurons)), (f"extract.{name}",)))
    steps += _reading_steps(exp, lake, refs, device=device, quiet=quiet)
    if exp.report is not None:
        steps.append(Step("report", argv("report", exp.report, lake=lake, positional=False),
                          Report(str(lake), dict(exp.report)),
                          tuple(s.id for s in steps if s.kind != "pixels")))
    return steps


def _pixel_steps(exp, lake: Path, *, workers: int | None,
                 quiet: bool) -> tuple[list[Step], dict[str, str]]:
    """A step per shared pixel store, and the store step each run reads."""
    from tokenlake.store import pixel_store_name

    decoder = exp.pixels["decoder"]
    by_name = {r.name(): r for r in exp.runs}
    steps, store_of = [], {}
    for s in exp.stores():
        sid = "pixels." + pixel_store_name(s.subset, {**s.cfg.to_dict(), "decoder": decoder})
        model = by_name[s.runs[0]]
        flags = {"lake": str(lake), "subset": s.subset, "model": model.model,
                 "img_size": s.cfg.img_size, "preprocess": None if model.preprocess == "model"
                 else model.preprocess, "decoder": None if decoder == "pil" else decoder}
        steps.append(Step(sid, argv("pixels", flags),
                          Pixels(str(lake), s.subset, s.cfg, decoder, len(s.runs), workers, quiet),
                          gpu=decoder != "pil"))
        store_of.update(dict.fromkeys(s.runs, sid))
    return steps, store_of


def _reading_steps(exp, lake: Path, refs: _Refs, *, device: str | None,
                   quiet: bool) -> list[Step]:
    """Analyses (of the runs they name, else of every run of the file), then probes."""
    steps = []
    for i, entry in enumerate(exp.analyses):
        runs = _runs_of(entry.get("runs"))
        needs = tuple(f"extract.{n}" for n in refs.names) if not runs else tuple(
            dict.fromkeys(x for r in runs for x in refs.run(r, "an analysis reads")))
        steps.append(Step(f"analyze.{i}.{entry['name']}", argv("analyze", entry, lake=lake),
                          Analyze(str(lake), dict(entry)), needs))
    for i, entry in enumerate(exp.probes):
        reads = [entry[k] for k in ("run", "test_run", "train_run", "run_without",
                                    "run_with_registers") if entry.get(k)]
        needs = tuple(dict.fromkeys(x for r in reads for x in refs.run(r, "a probe reads")))
        label = f"probe.{i}.{entry['name']}" + (f".{entry['run']}" if entry.get("run") else "")
        steps.append(Step(label, argv("probe", {**entry, "device": device}, lake=lake),
                          Probe(str(lake), dict(entry), device, quiet), needs, gpu=True))
    return steps


def _runs_of(value) -> list[str]:
    if not value:
        return []
    return [r.strip() for r in (value.split(",") if isinstance(value, str) else value)
            if r.strip()]
