"""Where the contrast matters: every estimator on products of a dataset, d = 2 to 32.

    python benchmarks/dimension.py --out benchmarks/results/dimension.json
    python benchmarks/dimension.py --datasets 8gaussians --dims 2 8 16 --steps 2000 --out f.json
    python benchmarks/dimension.py --report benchmarks/results/dimension.json
    python benchmarks/dimension.py --report benchmarks/results/dimension.json --write
    python benchmarks/dimension.py --equal-time benchmarks/results/dimension.json \
        --out benchmarks/results/dimension_time.json
    python benchmarks/dimension.py --check-logz benchmarks/results/dimension_logz.json --write
    python benchmarks/dimension.py --rescore f.json --set eval.logz=annealed --out g.json

Each (dataset, d, seed, estimator) is one run of ``experiment=truth`` with ``dataset.dim=d``
and ``train.max_steps=--steps`` (the same steps for every estimator), in its own process with
one torch thread (``--jobs`` at once, one per core), logging nowhere. The estimators
(``LABELS``): FCE with the paper's threshold rule (0.6) on the truth recipe's models, and
with the recipe's own stricter 0.75; NCE against the Gaussian fitted to the data; the flow
by maximum likelihood (its flow saved); NCE against that flow, fixed (NCE's noise is then a
pre-trained flow of the same seed); FCE against a flow whose base is widened to
N(0, 1.5^2 I) (threshold 0.6); the covering recipe (``experiment=truth_both``: the flow by
MLE, the EBM against a 50/50 mixture of it and the fitted Gaussian); and NCE against
flow_mle's flow with the energy on top of that flow (``ebm.base=noise``: log p =
log q - f - c, the flow's tails and normaliser inherited). Seeds 0, 1, 2: the recipes were
tuned on seeds >= 100 in 2-D, and nothing here is tuned.

Above 2-D the EBM's KL(data || EBM) needs its log Z, estimated by importance sampling with
``eval.logz_samples=--logz-samples`` points; where the weights' effective sample size is
below ``eval.min_ess`` the run reports no KL and the table says so (with the ESS), rather
than a number. The Fisher divergence and the centred log-density error need no normaliser
and are always reported. The JSON is rewritten after each run; a rerun skips the runs it
holds; ``--checkpoints DIR`` keeps every run's final checkpoint (its EBM among it) for a
later scoring. ``--report`` prints the tables; ``--write`` puts them and a figure (each score
against d, per estimator) into docs/dimension.md and docs/figures/dimension.png.

``--equal-time FILE`` runs every estimator again for the wall time FCE's run of the same
dataset, d and seed took in FILE (its equal-steps results): each label's steps are that time
times its own steps per second there; a label whose noise flow_mle trained gets that time less
flow_mle's (its pre-training is part of its cost). FCE's runs are copied from FILE.

``--rescore FILE --out FILE2 [--set eval.KEY=VALUE ...]`` scores FILE's runs (those the
``--labels``, ``--datasets``, ``--dims`` and ``--seeds`` name) again from the checkpoints
``--checkpoints`` kept, with today's evaluator and those changes to the runs' configs (the
models are the same; only the scores are new), and writes them to FILE2.

``--check-logz FILE`` measures both estimators of log Z where the truth is known: importance
sampling (in 2-D against the grid, 1,024^2 cells over [-9, 9]^2, for an energy near the
data's but not equal to it) and, above 2-D, annealed importance sampling beside it (with the
eval group's defaults): at d = 16 and 32 for that energy on each copy (log Z the copies'
count times the grid's: the regime of a trained EBM, near the data but not on it), for a
Gaussian energy with the data's mean and covariance and for one narrower than the data and
off its centre (log Z in closed form: the mass the proposal misses), and for the data's own
energy -log p_d (log Z = 0). It writes the errors, the estimators' standard errors and the
effective sample sizes to FILE (``--write``: to docs/dimension.md as well).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import statistics
import sys
from pathlib import Path

from analysis.regions import Region
from analysis.regions import write as write_regions
from fce.config import DATASET_NAMES

ROOT = Path(__file__).resolve().parents[1]


def _load_truth():
    """benchmarks/truth.py, whose runs these are (a script, loaded by path)."""
    spec = importlib.util.spec_from_file_location("truth", Path(__file__).with_name("truth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_truth = _load_truth()
flow_file, one_run = _truth.flow_file, _truth.one_run

# label -> (experiment, overrides); flow_mle first (nce_flow contrasts with its flow).
LABELS = {
    "flow_mle": ("truth", ["estimator=flow_mle", "train.ema_decay=0"]),
    "fce": ("truth", ["threshold.value=0.6"]),  # the paper's rule
    "fce_t075": ("truth", []),  # the truth recipe's stricter threshold, 0.75
    "nce": ("truth", ["estimator=nce"]),
    "nce_flow": ("truth", ["estimator=nce"]),  # + the noise flow of flow_mle's run
    "fce_wide": ("truth", ["estimator.base_scale=1.5", "threshold.value=0.6"]),
    "fce_mixture": ("truth_both", []),
    # NCE against flow_mle's flow with the energy on top of it (ebm.base=noise)
    "nce_flow_base": ("truth", ["estimator=nce", "ebm.base=noise"]),
}
# The labels whose noise is flow_mle's flow of the same dataset, d and seed.
NEEDS_FLOW = ("nce_flow", "nce_flow_base")
# NCE trains no flow: its flow's scores are of a flow at its initialisation, or flow_mle's.
FIXED_FLOW = ("nce", *NEEDS_FLOW)
DOC = ROOT / "docs" / "dimension.md"
FIGURE = ROOT / "docs" / "figures" / "dimension.png"
RESULTS = ROOT / "benchmarks" / "results" / "dimension.json"
COMMAND = "python benchmarks/dimension.py --report benchmarks/results/dimension.json --write"


def read_runs(parser: argparse.ArgumentParser, option: str, path: Path) -> list[dict]:
    """The runs of the JSON file an option names, or exit with one line."""
    if not path.is_file():
        parser.error(f"{option} {path}: no such file")
    return json.loads(path.read_text())


def key(run: dict) -> tuple[str, str, int, int]:
    return run["label"], run["dataset"], run["dim"], run["seed"]


def run_job(job: tuple) -> dict:
    label, dataset, dim, seed, experiment, overrides, flow_path, target = job
    result = one_run((experiment, dataset, seed, overrides, flow_path))
    del result["timeline"]  # the final metrics are what the tables read
    budget = {} if target is None else {"budget": "time", "target_seconds": target}
    return {"label": label, "dim": dim, **result, **budget}


def rescore_config(run: dict, overrides: list[str]):
    """``run``'s config composed again (its experiment, dataset, seed and overrides, as
    ``one_run`` composed it), with ``overrides`` on top, validated."""
    from fce.compose import compose
    from fce.config import validate

    given = [f"experiment={run['experiment']}", f"dataset={run['dataset']}"]
    given += [f"seed={run['seed']}", "device=cpu", "tracking=none"]
    cfg = compose([*given, *run["overrides"], *overrides])
    validate(cfg)
    return cfg


def rescore_job(job: tuple[dict, list[str]]) -> dict:
    """``run`` scored again from its kept checkpoint by today's evaluator (with ``overrides``
    of its config, e.g. ``eval.logz=annealed``): the same models, today's metrics."""
    import time

    import torch

    from fce import checkpoint
    from fce.factory import build
    from fce.names import EVAL_METRICS

    run, overrides = job
    torch.set_num_threads(1)
    trainer = build(rescore_config(run, overrides), torch.device("cpu")).trainer()
    trainer.load_state_dict(checkpoint.load(Path(run["flow_file"]))["trainer"])
    started = time.perf_counter()
    metrics = trainer.metrics()
    kept = {
        k: v for k, v in run["final"].items() if k not in EVAL_METRICS or k == "flow_step_share"
    }
    return {
        **run,
        "final": kept | metrics,
        "rescored": overrides,
        "rescore_seconds": time.perf_counter() - started,
    }


def rescore(runs: list[dict], overrides: list[str], jobs: int) -> list[dict]:
    """Every run with a kept checkpoint but flow_mle's (whose scores need no log Z) scored
    again; the others as they were."""
    todo = [
        i
        for i, r in enumerate(runs)
        if r["error"] is None and r["label"] != "flow_mle" and r.get("flow_file")
    ]
    out = list(runs)
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, maxtasksperchild=1) as pool:
        for i, run in zip(todo, pool.imap(rescore_job, [(runs[i], overrides) for i in todo])):
            out[i] = run
            print(f"{run['label']} {run['dataset']} d={run['dim']} seed {run['seed']}", flush=True)
    return out


def equal_time_steps(
    steps_runs: list[dict], label: str, dataset: str, dim: int, seed: int
) -> tuple[int, float] | None:
    """(steps, seconds) that give ``label`` FCE's training time on (dataset, dim, seed): the
    time FCE's equal-steps run spent training, evaluations left out (less flow_mle's, for a
    label whose noise flow_mle trained: that training is part of its cost), times the
    label's own training steps per second in its equal-steps run. None where a run is
    missing or the time is used up."""
    found = {key(r): r for r in steps_runs if r["error"] is None}
    fce = found.get(("fce", dataset, dim, seed))
    mine = found.get((label, dataset, dim, seed))
    if fce is None or mine is None:
        return None

    def training(run: dict) -> float:  # its evaluations are the same few for every run
        return run["seconds"] - run["eval_seconds"]

    seconds = training(fce)
    if label in NEEDS_FLOW:
        flow = found.get(("flow_mle", dataset, dim, seed))
        if flow is None:
            return None
        seconds -= training(flow)
    if seconds <= 0:
        return None
    return max(1, round(seconds * mine["steps"] / training(mine))), seconds


def jobs_of(
    args: argparse.Namespace, done: set, steps_runs: list[dict] | None = None
) -> list[list[tuple]]:
    """The pending runs in two waves: flow_mle's first (it saves the flows nce_flow needs).
    With ``steps_runs`` (the equal-steps results) each run gets FCE's wall time instead."""
    flows = args.flows
    waves: list[list[tuple]] = [[], []]
    for label in args.labels:
        experiment, overrides = LABELS[label]
        for dataset in args.datasets:
            for dim in args.dims:
                for seed in args.seeds:
                    if (label, dataset, dim, seed) in done:
                        continue
                    steps, target = args.steps, None
                    if steps_runs is not None:
                        budget = equal_time_steps(steps_runs, label, dataset, dim, seed)
                        if budget is None:
                            print(f"{label} {dataset} d={dim} seed {seed}: no time budget")
                            continue
                        steps, target = budget
                    common = [
                        f"train.max_steps={steps}",
                        f"eval.logz_samples={args.logz_samples}",
                        f"train.eval_every={max(steps // 4, 1)}",
                        "eval.fisher=true",  # in 2-D too, for the table's first row
                    ]
                    given = [*overrides, *common, f"dataset.dim={dim}"]
                    path = flows / f"d{dim}" / flow_file(Path(), dataset, seed)
                    save = None
                    if label == "flow_mle" and steps_runs is None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save = str(path.resolve())
                    elif args.checkpoints is not None:  # every other run's, to score again
                        kept = (
                            args.checkpoints / f"d{dim}" / label / flow_file(Path(), dataset, seed)
                        )
                        kept.parent.mkdir(parents=True, exist_ok=True)
                        save = str(kept.resolve())
                    if label in NEEDS_FLOW:
                        given += [
                            "estimator.noise=flow",
                            f"estimator.noise_checkpoint={path.resolve()}",
                        ]
                    job = (label, dataset, dim, seed, experiment, given, save, target)
                    waves[0 if label == "flow_mle" else 1].append(job)
    return waves


# --- the tables ---------------------------------------------------------------------------------


def cell(values: list[float], digits: int = 3) -> str:
    """mean ± standard error over the seeds (one seed: its value)."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def metric_cell(runs: list[dict], metric: str) -> str:
    if not runs:
        return "not run"
    finals = [r["final"] for r in runs if r["error"] is None]
    values = [f[metric] for f in finals if metric in f]
    text = cell(values)
    refused = len(finals) - len(values)
    if refused and metric in ("kl_data_ebm", "nll_ebm"):
        # neither estimate reached the floor; the annealed one's ESS where it ran
        ess = [
            f.get("logz_ais_ess", f.get("logz_ess", math.nan)) for f in finals if metric not in f
        ]
        text += f" ({refused} not reported: ESS {min(ess):.0f})"
    failed = len(runs) - len(finals)
    if failed:
        text += f" ({failed} failed)"
    return text


TABLE_METRICS = {
    "kl_data_ebm": "KL(data ‖ EBM) in nats: log Z by importance sampling, the EBM's own modes "
    "in the proposal (d = 2: on the grid over [-4, 4]², as every 2-D run)",
    "fisher_rel": "Fisher divergence of the EBM, ½ E‖∇log p_θ − ∇log p_d‖², over the data's "
    "own ½ E‖∇log p_d‖² (0: the data's score; 1: a flat energy's)",
    "mse_logp_centered": "centred log-density error of the EBM, Var(log p_θ − log p_d)",
    "kl_data_flow": "KL(data ‖ flow), exact (nats)",
    "flow_step_share": "share of FCE's steps that trained its flow",
}
# The two-sided 97.5% quantile of Student's t with n - 1 degrees of freedom, n = 2..10: a
# paired difference over n seeds is called a tie unless it exceeds this many standard errors.
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306}


def data_fisher_term(dataset: str, dim: int, points: int = 4096) -> float:
    """½ E‖∇log p_d‖² over the points ``fisher_ebm`` uses (the first 4,096 held-out points
    of eval.seed 0): what a flat energy, whose score is 0, scores."""
    from fce.data import DataSource, make_generator

    data = DataSource(dataset, 1, dim).dataset
    x = data.sample(20_000, make_generator(0, "eval"))[:points].double()
    return 0.5 * data.score(x).square().sum(1).mean().item()


def with_relative_fisher(runs: list[dict]) -> list[dict]:
    """``runs`` with ``fisher_rel`` = fisher_ebm over the data's term, where logged."""
    terms: dict[tuple[str, int], float] = {}
    out = []
    for r in runs:
        final = r["final"]
        if "fisher_ebm" in final:
            where = (r["dataset"], r["dim"])
            if where not in terms:
                terms[where] = data_fisher_term(*where)
            final = {**final, "fisher_rel": final["fisher_ebm"] / terms[where]}
        out.append({**r, "final": final})
    return out


def shown_labels(part: list[dict], metric: str) -> list[str]:
    labels = [label for label in LABELS if any(r["label"] == label for r in part)]
    if metric == "flow_step_share":
        return [label for label in labels if label.startswith("fce") and label != "fce_mixture"]
    return [
        label
        for label in labels
        if any(metric in r["final"] for r in part if r["label"] == label)
        and (label not in FIXED_FLOW or not metric.endswith("_flow"))
    ]


def tables(runs: list[dict]) -> str:
    runs = with_relative_fisher(runs)
    out = []
    for dataset in sorted({r["dataset"] for r in runs}):
        part = [r for r in runs if r["dataset"] == dataset]
        dims = sorted({r["dim"] for r in part})
        seeds = sorted({r["seed"] for r in part})
        if any(r.get("budget") == "time" for r in part):
            budget = "each estimator for FCE's wall time"
        else:
            budget = f"{max(r['steps'] for r in part):,} steps each"
        out.append(f"#### {dataset}: seeds {', '.join(map(str, seeds))}, {budget}\n")
        for metric, title in TABLE_METRICS.items():
            shown = shown_labels(part, metric)
            if not shown:
                continue
            out.append(f"{title}; mean ± standard error over the seeds:\n")
            out.append("| d | " + " | ".join(shown) + " |")
            out.append("|---|" + "---|" * len(shown))
            for dim in dims:
                cells = [
                    metric_cell(
                        [r for r in part if r["label"] == label and r["dim"] == dim], metric
                    )
                    for label in shown
                ]
                out.append(f"| {dim} | " + " | ".join(cells) + " |")
            out.append("")
        for metric in ("kl_data_ebm", "mse_logp_centered"):
            out.append(paired_table(part, dims, metric))
    return "\n".join(out)


def paired_table(part: list[dict], dims: list[int], metric: str, base: str = "nce") -> str:
    """Each estimator's ``metric`` minus NCE's (fitted Gaussian), seed by seed: the mean
    difference, its standard error and the number of pairs (seeds where both reported it);
    better or worse only where the difference exceeds Student's t 97.5% quantile times the
    standard error, a tie otherwise."""
    labels = [
        label
        for label in LABELS
        if label not in (base, "flow_mle") and any(r["label"] == label for r in part)
    ]
    if not labels or not any(r["label"] == base for r in part):
        return ""
    lines = [
        f"{metric} of each estimator minus {base}'s, paired by seed: mean ± standard error "
        "(pairs); negative is closer to the truth than NCE with the fitted Gaussian; better or "
        "worse only beyond the 97.5% t quantile times the standard error, a tie otherwise:\n",
        "| d | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]

    def by_seed(label: str, dim: int) -> dict[int, float]:
        return {
            r["seed"]: r["final"][metric]
            for r in part
            if r["label"] == label and r["dim"] == dim and metric in r["final"]
        }

    for dim in dims:
        cells = []
        theirs = by_seed(base, dim)
        for label in labels:
            mine = by_seed(label, dim)
            diffs = [mine[s] - theirs[s] for s in mine if s in theirs]
            if len(diffs) < 2:
                cells.append(f"— ({len(diffs)})")
                continue
            mean = statistics.fmean(diffs)
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            quantile = T_975.get(len(diffs), 1.96)
            verdict = "tie" if abs(mean) <= quantile * se else ("better" if mean < 0 else "worse")
            cells.append(f"{mean:+.3f} ± {se:.3f} ({len(diffs)}, {verdict})")
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], path: Path) -> None:
    """Each score against d (log scale), one line per estimator, one row per dataset; a
    hollow marker where fewer seeds than run reported the score (a withheld KL)."""
    from matplotlib.figure import Figure

    runs = with_relative_fisher(runs)
    datasets = sorted({r["dataset"] for r in runs})
    metrics = [m for m in TABLE_METRICS if m != "flow_step_share"]
    fig = Figure(figsize=(4 * len(metrics), 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), len(metrics), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        part = [r for r in runs if r["dataset"] == dataset]
        for ax, metric in zip(row, metrics, strict=True):
            for i, label in enumerate(LABELS):
                if label not in shown_labels(part, metric):
                    continue
                points, partial = [], []
                for dim in sorted({r["dim"] for r in part}):
                    cell_runs = [r for r in part if (r["label"], r["dim"]) == (label, dim)]
                    values = [
                        r["final"][metric]
                        for r in cell_runs
                        if r["error"] is None and metric in r["final"]
                    ]
                    if values:
                        points.append((dim, statistics.fmean(values)))
                        if len(values) < len(cell_runs):
                            partial.append(points[-1])
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", label=label, color=f"C{i}")
                for x, y in partial:
                    ax.plot([x], [y], marker="o", markersize=10, mfc="white", color=f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("d")
            ax.set_title(f"{dataset}: {metric}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


# --- the importance sampler against known normalisers ----------------------------------------

LOGZ_DATASETS = ("8gaussians", "rings", "spiral")
LOGZ_RESULTS = ROOT / "benchmarks" / "results" / "dimension_logz.json"
LOGZ_COMMAND = (
    "python benchmarks/dimension.py --check-logz benchmarks/results/dimension_logz.json --write"
)


def check_logz(samples: int = 20_000, seed: int = 3) -> list[dict]:
    """Each case's exact log Z, and each estimator's estimate, standard error and ESS: by
    importance sampling from ``samples`` points and by annealing ``chains`` chains through
    ``steps`` temperatures (the eval group's defaults; see the module)."""
    import torch

    from fce.config import ANNEALING_DEFAULTS
    from fce.data import get_dataset, make_generator, product
    from fce.metrics import AnnealedNormaliser, Grid, ImportanceNormaliser

    chains, steps = ANNEALING_DEFAULTS["ais_chains"], ANNEALING_DEFAULTS["ais_steps"]

    torch.set_num_threads(1)
    rows = []
    for name in LOGZ_DATASETS:
        for dim in (2, 16, 32):
            dataset = product(get_dataset(name), dim // 2)
            x = dataset.sample(20_000, make_generator(0, "eval"), torch.float64)
            estimators = {
                "importance": ImportanceNormaliser(dataset, x, n=samples, seed=seed),
                "annealed": AnnealedNormaliser(x.float(), chains, steps, seed=seed),
            }
            cases = {}
            base = get_dataset(name)

            def near(points, base=base):  # near the 2-D data's energy, not equal to it
                return -0.8 * base.log_prob(points) + 0.05 * (points - 0.3).pow(2).sum(1)

            grid = Grid.make(limit=9.0, cells=1024, dtype=torch.float64)
            near_log_z = grid.log_integral(-near(grid.points)).item()
            if dim == 2:
                cases["near the data (grid)"] = (near, near_log_z)
            else:
                # The same energy on every copy: log Z is the copies' count times the grid's.
                def near_product(points, k=dim // 2):
                    return near(points.reshape(-1, 2)).reshape(-1, k).sum(1)

                cases["near the data, per copy (grid)"] = (near_product, dim // 2 * near_log_z)
                mean, cov = x.mean(0), torch.cov(x.T, correction=0)
                precision = torch.linalg.inv(cov)

                def gaussian(points, mean=mean, precision=precision):
                    centred = points - mean
                    return 0.5 * ((centred @ precision) * centred).sum(1)

                exact = 0.5 * (dim * math.log(2 * math.pi) + torch.logdet(cov))
                cases["Gaussian, the data's moments"] = (gaussian, exact)

                # Narrower than the data and off its centre: the proposal misses it.
                def narrow(points, mean=mean + 1.0):
                    return 2.0 * (points - mean).square().sum(1)

                cases["Gaussian, sd 0.5, mean + 1"] = (narrow, 0.5 * dim * math.log(math.pi / 2))
            cases["the data's own, -log p_d"] = (lambda p, d=dataset: -d.log_prob(p), 0.0)
            for case, (energy, exact) in cases.items():
                for method, estimator in estimators.items():
                    if method == "annealed" and dim == 2:
                        continue  # the grid normalises every 2-D run
                    estimate = estimator(lambda p, e=energy: e(p.double()))
                    rows.append(
                        {
                            "dataset": name,
                            "dim": dim,
                            "energy": case,
                            "method": method,
                            "exact": float(exact),
                            "estimate": estimate.value.item(),
                            "se": estimate.se.item(),
                            "ess": estimate.ess.item(),
                            "samples": samples,
                            "chains": chains,
                            "steps": steps,
                        }
                    )
    return rows


def logz_table(rows: list[dict], min_ess: float = 100) -> str:
    first = rows[0]
    lines = [
        f"log Z by importance sampling ({first['samples']:,} points) and, above 2-D, by "
        f"annealed importance sampling ({first['chains']:,} chains, {first['steps']} "
        "temperatures) against the exact value: the error, the estimator's own standard "
        f"error, and the effective sample size (below {min_ess:.0f} a run withholds the "
        "estimate).",
        "",
        "| dataset | d | energy | method | error | standard error | ESS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = f"{r['estimate'] - r['exact']:+.4f}"
        if r["ess"] < min_ess:
            error += " (withheld)"
        lines.append(
            f"| {r['dataset']} | {r['dim']} | {r['energy']} | {r['method']} | {error} "
            f"| {r['se']:.4f} | {r['ess']:,.0f} |"
        )
    lines.append("")
    for method in ("importance", "annealed"):
        kept = [r for r in rows if r["method"] == method and r["ess"] >= min_ess]
        withheld = sum(r["method"] == method and r["ess"] < min_ess for r in rows)
        worst = max(abs(r["estimate"] - r["exact"]) / r["se"] for r in kept)
        lines.append(
            f"- {method}: the largest error of a reported estimate is {worst:.1f} standard "
            f"errors; {withheld} of {len(kept) + withheld} withheld."
        )
    return "\n".join(lines) + "\n"


ANNEALED_RESULTS = ROOT / "benchmarks" / "results" / "dimension_annealed.json"
ANNEALED_COMMAND = (
    "python benchmarks/dimension.py --annealed benchmarks/results/dimension_annealed.json --write"
)


def annealed_table(runs: list[dict]) -> str:
    """Per run scored with ``--set eval.logz=annealed``: the KL that importance sampling
    (the modes in its proposal) gives, and how far annealed importance sampling's log Z
    falls from it, with both ESS."""
    first = runs[0]
    lines = [
        f"{first['dataset']} at d = {first['dim']}, {first['steps']:,} steps: each EBM's log Z "
        "by importance sampling with its modes in the proposal and by annealed importance "
        "sampling (the eval group's defaults), from the same checkpoint.",
        "",
        "| estimator | seed | KL(data ‖ EBM) | ESS | annealed log Z − importance's | "
        "annealed ESS |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["label"], r["seed"])):
        f = r["final"]
        lines.append(
            f"| {r['label']} | {r['seed']} | {f['kl_data_ebm']:.2f} | {f['logz_ess']:,.0f} "
            f"| {f['logz_ais_minus_is']:+.1f} | {f['logz_ais_ess']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def committed_annealed() -> str:
    return annealed_table(json.loads(ANNEALED_RESULTS.read_text()))


def committed_logz() -> str:
    return logz_table(json.loads(LOGZ_RESULTS.read_text()))


def committed_tables() -> str:
    return tables(json.loads(RESULTS.read_text())) + "\n"


# The README's summary: each estimator's KL(data || EBM) at every d, in one line per dataset.
SUMMARY_LABELS = {
    "nce": "NCE (fitted Gaussian)",
    "fce": "FCE",
    "nce_flow": "NCE (flow-MLE's flow)",
    "fce_mixture": "the covering recipe (the EBM against flow + Gaussian)",
    "nce_flow_base": "the energy on flow-MLE's flow",
    "flow_mle": "flow-MLE's flow itself",
}


def summary(runs: list[dict]) -> str:
    """Per dataset, each estimator's mean KL(data || model) over the seeds at every d (the
    EBM's; flow-MLE's flow's): "—" where some seed's was withheld or failed, "not run" where
    none ran."""
    lines = []
    for dataset in sorted({r["dataset"] for r in runs}):
        part = [r for r in runs if r["dataset"] == dataset]
        dims = sorted({r["dim"] for r in part})
        cells = []
        for label, title in SUMMARY_LABELS.items():
            metric = "kl_data_flow" if label == "flow_mle" else "kl_data_ebm"
            values = []
            for dim in dims:
                found = [r for r in part if (r["label"], r["dim"]) == (label, dim)]
                kls = [r["final"].get(metric) for r in found if r["error"] is None]
                complete = found and len(kls) == len(found) and None not in kls
                values.append(
                    f"{statistics.fmean(kls):.2f}" if complete else "—" if found else "not run"
                )
            cells.append(f"{title} {'/'.join(values)}")
        lines.append(f"{dataset}, d = {'/'.join(map(str, dims))}: " + "; ".join(cells) + ".")
    return "\n".join(lines) + "\n"


def committed_summary() -> str:
    return summary(json.loads(RESULTS.read_text()))


# The regions of docs/dimension.md these commands make (tests/test_generated_docs.py).
README = ROOT / "README.md"
REGIONS = [
    Region(DOC, "logz check", LOGZ_COMMAND, committed_logz),
    Region(DOC, "annealed check", ANNEALED_COMMAND, committed_annealed),
    Region(DOC, "dimension table", COMMAND, committed_tables),
    Region(README, "dimension summary", COMMAND, committed_summary),
]


def write(runs: list[dict]) -> int:
    regions = [
        Region(DOC, "dimension table", COMMAND, lambda: tables(runs) + "\n"),
        Region(README, "dimension summary", COMMAND, lambda: summary(runs)),
    ]
    figure(runs, FIGURE)
    return write_regions(regions, "benchmarks/dimension.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "rings"])
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--labels", nargs="+", default=list(LABELS), help="estimators to run")
    parser.add_argument("--steps", type=int, default=4000, help="train.max_steps of every run")
    parser.add_argument("--logz-samples", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one core each")
    parser.add_argument("--flows", type=Path, default=Path("benchmarks/results/dimension_flows"))
    parser.add_argument("--out", type=Path, help="add the runs to this JSON file")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        metavar="DIR",
        help="also keep each run's final checkpoint (its EBM among it) under DIR",
    )
    parser.add_argument(
        "--equal-time",
        type=Path,
        metavar="FILE",
        help="give each run FCE's wall time in FILE's equal-steps runs (FCE's own are copied)",
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="FILE",
        help="score FILE's runs again from their --checkpoints (into --out)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="with --rescore: change the saved configs' evaluation, e.g. eval.logz=annealed",
    )
    parser.add_argument("--report", type=Path, help="print the tables of this file")
    parser.add_argument(
        "--annealed",
        type=Path,
        metavar="FILE",
        help="print the table of FILE, runs scored with --set eval.logz=annealed",
    )
    parser.add_argument("--write", action="store_true", help="with --report: update the docs")
    parser.add_argument(
        "--check-logz", type=Path, metavar="FILE", help="check log Z's estimate; write FILE"
    )
    args = parser.parse_args(argv)
    if args.check_logz:
        rows = check_logz()
        args.check_logz.write_text(json.dumps(rows, indent=1))
        print(logz_table(rows))
        if args.write:
            region = Region(DOC, "logz check", LOGZ_COMMAND, lambda: logz_table(rows))
            return write_regions([region], "benchmarks/dimension.py")
        return 0
    if args.rescore:
        saved = read_runs(parser, "--rescore", args.rescore)
        if args.out is None:
            parser.error("--out FILE: where the scored runs go")
        bad = [item for item in args.set if "=" not in item or not item.startswith("eval.")]
        if bad:
            parser.error(f"--set {bad[0]}: must be eval.KEY=VALUE (only the scoring changes)")
        runs = [  # those --labels, --datasets, --dims and --seeds name (all by default)
            r
            for r in saved
            if r["label"] in args.labels
            and r["dataset"] in args.datasets
            and r["dim"] in args.dims
            and r["seed"] in args.seeds
        ]
        from fce.compose import composition_error
        from fce.errors import ConfigError

        for run in runs[:1]:  # every run takes the same --set: one check before any starts
            try:
                rescore_config(run, args.set)
            except ConfigError as error:
                parser.error(f"--set: {error}")
            except Exception as error:  # composition: an unknown key, a wrong type
                parser.error(f"--set: {composition_error(error)}")
        runs = rescore(runs, args.set, args.jobs)
        args.out.write_text(json.dumps(runs, indent=1))
        return 0
    if args.annealed:
        rows = read_runs(parser, "--annealed", args.annealed)
        print(annealed_table(rows))
        if args.write:
            region = Region(DOC, "annealed check", ANNEALED_COMMAND, lambda: annealed_table(rows))
            return write_regions([region], "benchmarks/dimension.py")
        return 0
    if args.report:
        runs = read_runs(parser, "--report", args.report)
        print(tables(runs))
        return write(runs) if args.write else 0
    if args.write:
        parser.error("--write: only with --report FILE, --annealed FILE or --check-logz FILE")
    for name, values, allowed in (
        ("--datasets", args.datasets, DATASET_NAMES),
        ("--labels", args.labels, tuple(LABELS)),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{name} {unknown[0]}: choose from {', '.join(allowed)}")
    bad = [d for d in args.dims if d < 2 or d % 2 or d > 64]
    if bad:
        parser.error(f"--dims {bad[0]}: each must be an even integer in [2, 64]")
    needs_flows = set(NEEDS_FLOW) & set(args.labels)
    if needs_flows and ("flow_mle" not in args.labels or args.equal_time):
        missing = [
            path
            for dataset in args.datasets
            for dim in args.dims
            for seed in args.seeds
            if not (path := args.flows / f"d{dim}" / flow_file(Path(), dataset, seed)).is_file()
        ]
        if missing:
            parser.error(f"--labels: no flow {missing[0]}; run flow_mle with it")
    if args.out is None:
        parser.error("--out FILE: where the runs go")
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    steps_runs = None
    if args.equal_time:
        steps_runs = read_runs(parser, "--equal-time", args.equal_time)
        # FCE's runs are its own equal-time runs; flow_mle's flows are the noise as trained.
        held = {key(r) for r in previous}
        previous += [
            {**r, "budget": "time"}
            for r in steps_runs
            if r["label"] == "fce"
            and key(r) not in held
            and r["dataset"] in args.datasets
            and r["dim"] in args.dims
            and r["seed"] in args.seeds
        ]
        args.labels = [label for label in args.labels if label not in ("fce", "flow_mle")]
    done = {key(r) for r in previous}
    runs = list(previous)
    context = multiprocessing.get_context("spawn")
    failed = 0
    with context.Pool(args.jobs, maxtasksperchild=1) as pool:
        for wave in jobs_of(args, done, steps_runs):
            for result in pool.imap_unordered(run_job, wave):
                runs.append(result)
                failed += result["error"] is not None
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(runs, indent=1))
                tmp.replace(args.out)
                status = result["error"] or f"{result['seconds']:.0f}s"
                print(
                    f"{result['label']} {result['dataset']} d={result['dim']} "
                    f"seed {result['seed']}: {status}",
                    flush=True,
                )
    new = len(runs) - len(previous)
    if new and failed == new:
        print(f"every one of the {new} runs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
