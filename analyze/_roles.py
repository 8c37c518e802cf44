"""Which run speaks for each model in the verdicts: one canonical run per model.

A lake holds many runs of one model: the val5k run the claims are about, 800 px showcase runs,
200k keep-if-outlier training selections, test-time-register and MLP-recording interventions, runs
preprocessed with DINOv2's evaluation recipe for Table 4. Only the first kind measures what claims
1-3 (and claim 5's artifact half) state: the model as published, at its own resolution, on every
image of the paper's 5,000-image validation subset ("we also randomly sample 5,000 images from the
validation set", Section 3.3). Every other run is still drawn in the figures, but left out of the
verdicts with the reason, so a verdict never depends on which runs happen to share a lake.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenlake.analyze._common import RunInfo, _field

DEFAULT_SUBSET = "val5k"
# Policies that keep every token's norm, attention and neighbour cosine (only embeddings differ),
# ranked for the tie-break: all > summary > sample. Issue 10 asked for "policy all"; claims 1-3
# read only those three columns, and experiments/paper.toml extracts most of its val5k models with
# `summary` (all is kept for the probed models), so requiring `all` would drop them from claim 2.
POLICY_RANK = {"all": 0, "summary": 1, "sample": 2}
NATIVE_UNKNOWN = "native resolution unknown (extracted before tokenlake recorded it; re-extract)"
TIE_BREAK = "pretrained before random weights, then policy all > summary > sample, then run name"


@dataclass(frozen=True)
class Role:
    """A run's part in the verdicts: canonical (speaks for its model) or left out, and why."""

    run: str
    model: str
    canonical: bool
    random_weights: bool
    why: str = ""  # why the run is left out; "" when canonical
    explicit: bool = False  # chosen with --runs: used as given, no selection


def run_config(info: RunInfo) -> dict:
    cfg = info.manifest.get("config")
    return cfg if isinstance(cfg, dict) else {}


def exclusions(info: RunInfo, *, subset: str | None) -> dict[str, str]:
    """Every reason `info` cannot be a canonical run, by check (empty: it can). Checks: subset
    (skipped when subset is None), native, selection, policy, intervention, preprocess."""
    m, cfg = info.manifest, run_config(info)
    why = {}
    if subset is not None and info.subset != subset:
        why["subset"] = (f"subset {info.subset!r}, not the canonical subset {subset!r} "
                         "(--subset NAME judges another)")
    native = m.get("native_img_size")
    if native is None:
        why["native"] = NATIVE_UNKNOWN
    elif info.img_size != native:
        why["native"] = f"{info.img_size} px, not the model's native {native} px"
    if cfg.get("keep_if_outlier"):
        why["selection"] = "keep-if-outlier selection (only images with an outlier, not every image)"
    policy = _field(m, "policy")
    if policy not in POLICY_RANK:
        why["policy"] = (f"policy {policy!r} (claims 1-3 read every token's norm, attention and "
                         "neighbour cosine, which policies all, summary and sample keep)")
    iv = [text for text, on in (
        ("intervention: test-time registers", cfg.get("test_time_registers") is not None),
        ("MLP-recording run (--record-mlp), for the neuron ranking", bool(cfg.get("record_mlp"))),
    ) if on]
    if iv:
        why["intervention"] = "; ".join(iv)
    pre = cfg.get("preprocess", "model")
    if pre != "model":
        why["preprocess"] = (f"preprocess {pre!r}, not the model's own ('dinov2-eval' is Table "
                             "4's recipe)")
    return why


def select_roles(infos: list[RunInfo], *, subset: str, explicit: bool) -> dict[str, Role]:
    """run -> Role. explicit (runs chosen with --runs): every run is used as given."""
    if explicit:
        return {i.run: Role(i.run, i.model, True, i.random_weights, explicit=True) for i in infos}
    roles: dict[str, Role] = {}
    cands: dict[str, list[RunInfo]] = {}
    for i in infos:
        why = exclusions(i, subset=subset)
        if why:
            roles[i.run] = Role(i.run, i.model, False, i.random_weights,
                                why="; ".join(why.values()))
        else:
            cands.setdefault(i.model, []).append(i)
    for model, group in cands.items():
        group.sort(key=lambda i: (i.random_weights, POLICY_RANK[_field(i.manifest, "policy")], i.run))
        best = group[0]
        roles[best.run] = Role(best.run, model, True, best.random_weights)
        for i in group[1:]:
            roles[i.run] = Role(i.run, model, False, i.random_weights,
                                why=f"another run of {model} is canonical: {best.run} "
                                    f"(tie-break: {TIE_BREAK})")
    return {i.run: roles[i.run] for i in infos}


def canonical(roles: dict[str, Role]) -> list[str]:
    return [r for r, role in roles.items() if role.canonical]


def no_subset_note(infos: list[RunInfo], *, subset: str) -> str | None:
    """The reason every lake-based verdict lacks data when no run is on the canonical subset."""
    if any(i.subset == subset for i in infos):
        return None
    have = sorted({str(i.subset) for i in infos})
    return (f"no run is on the canonical subset {subset!r} (the lake's runs are on: "
            f"{', '.join(have)}); pass --subset NAME (report(..., subset=NAME)) to judge the "
            "claims on another subset")
