"""
Compute-optimal model size from an iso-FLOP sweep (Chinchilla's approach 2, arXiv:2203.15556), and the
plots of scripts/scaling_laws.py.

Each budget C (training FLOPs) trains models of several depths for exactly C FLOPs. Per budget, a
parabola of val bpb against ln N has its minimum at the compute-optimal size N*(C); the tokens that
model gets for C are D*(C) = C / F(N*), with F the training FLOPs per token in base_train's own count:

    F = 6 * N + 12 * n_layer * n_embd * sequence_len        (nanochat.gpt.GPT.estimate_flops)

N here counts every parameter but the token embedding (a table lookup: no multiply-adds); the lm_head
is in it. Against the 6N of Kaplan et al. and Chinchilla (C = 6ND), F adds the attention scores and
their weighted sum (12 L d T: ~17% of F for the speedrun's d20 at T=2048, more for small models); and
Chinchilla's N also counts the embeddings. Fitting N* = k C^a and D* = k' C^b in log space gives the
exponents (a + b = 1 when F = 6N exactly) and the optimal tokens per parameter D*/N*.

A budget whose best measured point is its smallest or largest model, or whose parabola has its minimum
outside the sizes it measured, has not found its optimum: the fit there is an extrapolation. Those
budgets are marked "edge", kept out of the exponent fits, and said so.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nanochat.common import atomic_write
from nanochat.gpt import GPT, depth_config

# Published CORE scores to draw as reference lines, never as our results: the four GPT-2 models as measured
# by upstream nanochat on the full 22-task CORE bundle (karpathy/nanochat, dev/estimate_gpt3_core.ipynb;
# the README's GPT-2 line is XL's 0.256525).
CORE_REFERENCES = [
    ("GPT-2 124M", 0.1139),
    ("GPT-2 Medium 355M", 0.1849),
    ("GPT-2 Large 774M", 0.2146),
    ("GPT-2 XL 1.6B", 0.2565),
]
CORE_REFERENCE_SOURCE = "measured by upstream nanochat on all 22 CORE tasks (dev/estimate_gpt3_core.ipynb)"
CORE_TASKS = 22  # the references are comparable only with a CORE over the same task set

PARAM_COUNTS = {"no_embedding": "params_no_embedding", "all": "params"}  # --params_for_fit -> the CSV column


def model_counts(depth, vocab_size, sequence_len):
    """(params, params without the token embedding, training FLOPs per token) of base_train's model of a depth."""
    with torch.device("meta"):  # shapes only
        model = GPT(depth_config(depth, vocab_size, sequence_len))
    params = sum(p.numel() for p in model.parameters())
    return params, params - model.transformer.wte.weight.numel(), model.estimate_flops()


def budget_tag(budget):
    """1e13 -> '1e13', 2.15e18 -> '2.15e18': short, and safe in a folder name."""
    return f"{budget:.3g}".replace("e+", "e").replace("e0", "e")


def power_law(x, y):
    """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log space."""
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return float(exponent), float(math.exp(log_coefficient))


def interpolate_loglog(x, xs, ys):
    """y at x on the piecewise-linear log-log curve through (xs, ys), extended along its end segments."""
    order = np.argsort(xs)
    lx, ly = np.log(np.asarray(xs, dtype=float)[order]), np.log(np.asarray(ys, dtype=float)[order])
    if len(lx) == 1:
        return float(ys[0]) * x / float(xs[0])  # one model: F proportional to N
    i = int(np.clip(np.searchsorted(lx, math.log(x)) - 1, 0, len(lx) - 2))
    slope = (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])
    return float(math.exp(ly[i] + slope * (math.log(x) - lx[i])))


@dataclass
class BudgetFit:
    """The iso-FLOP fit of one budget. status: interior (an optimum found), edge, no minimum, too few points."""
    budget: float
    params: list  # N of the points, ascending
    bpb: list
    status: str
    coefficients: tuple = None  # bpb = c2 (ln N)^2 + c1 ln N + c0
    n_opt: float = None
    bpb_opt: float = None
    tokens_opt: float = None

    @property
    def ratio(self):
        return self.tokens_opt / self.n_opt if self.n_opt else None


def fit_budget(budget, params, bpb, flops_per_token):
    """
    Fit one budget's points (params: N of each, bpb: its val bpb); flops_per_token(N) gives F for D* = C / F(N*).
    The vertex is computed whenever the parabola opens upwards, edge or not: the caller decides what to trust.
    """
    order = np.argsort(params)
    params, bpb = [float(params[i]) for i in order], [float(bpb[i]) for i in order]
    if len(params) < 3:
        return BudgetFit(budget, params, bpb, "too few points")
    c2, c1, c0 = np.polyfit(np.log(params), bpb, 2)
    if c2 <= 0:
        return BudgetFit(budget, params, bpb, "no minimum", (c2, c1, c0))
    log_n = -c1 / (2 * c2)
    n_opt = math.exp(log_n)
    best = int(np.argmin(bpb))
    inside = params[0] < n_opt < params[-1]
    status = "interior" if inside and 0 < best < len(params) - 1 else "edge"
    return BudgetFit(budget, params, bpb, status, (c2, c1, c0), n_opt, float(c0 + c1 * log_n + c2 * log_n ** 2),
                     budget / flops_per_token(n_opt))


@dataclass
class SweepFit:
    budgets: list  # BudgetFit per budget, ascending
    used: list  # the budgets the exponents and the ratio come from (interior ones)
    a: float = None  # N* ~ C^a
    b: float = None  # D* ~ C^b
    ratio: float = None  # D*/N*, geometric mean over the used budgets
    ratio_6n: float = None  # the same with D* = C / 6N* (the usual convention), for comparison
    spread: dict = field(default_factory=dict)  # "a", "b", "ratio" -> (min, max) over leave-one-depth-out refits
    refits: list = field(default_factory=list)  # (left-out depth, a, b, ratio, every optimum still interior)
    notes: list = field(default_factory=list)  # plain words on what could not be fit and why


def _fit_rows(rows, param_key, flops_per_token, only_budgets=None):
    """BudgetFit per budget, then the exponents and ratio over the interior ones (or over only_budgets)."""
    budgets = sorted({r["budget"] for r in rows})
    fits = []
    for budget in budgets:
        points = [r for r in rows if r["budget"] == budget]
        fits.append(fit_budget(budget, [r[param_key] for r in points], [r["val_bpb"] for r in points],
                               flops_per_token))
    if only_budgets is None:
        used = [f for f in fits if f.status == "interior"]
    else:
        used = [f for f in fits if f.budget in only_budgets and f.n_opt is not None]
    result = SweepFit(fits, used)
    if used:
        result.ratio = float(math.exp(np.mean([math.log(f.ratio) for f in used])))
        result.ratio_6n = float(math.exp(np.mean([math.log(f.budget / (6 * f.n_opt) / f.n_opt) for f in used])))
    if len(used) >= 2:
        result.a, _ = power_law([f.budget for f in used], [f.n_opt for f in used])
        result.b, _ = power_law([f.budget for f in used], [f.tokens_opt for f in used])
    return result


def fit_sweep(rows, param_key="params_no_embedding"):
    """
    rows: dicts with budget, depth, val_bpb, flops_per_token and the parameter count param_key (one per point).
    Returns a SweepFit whose spread comes from refitting with each depth left out in turn (same budgets).
    """
    models = {r["depth"]: (r[param_key], r["flops_per_token"]) for r in rows}
    sizes = [n for n, _ in models.values()]
    flops = [f for _, f in models.values()]
    flops_per_token = lambda n: interpolate_loglog(n, sizes, flops)  # F between (and beyond) the measured models
    result = _fit_rows(rows, param_key, flops_per_token)
    for f in result.budgets:
        if f.status == "edge":
            side = "smallest" if f.bpb[0] <= min(f.bpb) else "largest" if f.bpb[-1] <= min(f.bpb) else None
            where = f"its best point is its {side} model" if side else "the parabola's minimum lies outside its models"
            result.notes.append(f"budget {f.budget:.3g}: optimum not found ({where}); the fit there is an "
                                f"extrapolation{' to N*=' + format(f.n_opt, '.3g') if f.n_opt else ''}, left out "
                                f"of the exponents. Add {'smaller' if side == 'smallest' else 'larger'} depths.")
        elif f.status != "interior":
            result.notes.append(f"budget {f.budget:.3g}: {f.status} ({len(f.params)} points); left out")
    if len(result.used) < 2:
        result.notes.append(f"{len(result.used)} budget(s) with an interior optimum: the exponents a and b need two")
    if result.used and min(len(f.params) for f in result.used) < 4:
        result.notes.append("no spread: a budget of three depths has none left to refit with one left out "
                            "(three points fix a parabola exactly); four or more depths give one")
    # The spread: refit with each depth left out, over the same budgets. A refit that puts a budget's optimum at
    # the edge of its remaining depths is an extrapolation, kept out of the spread as out of the main fit.
    used_budgets = {f.budget for f in result.used}
    for depth in sorted(models):
        refit = _fit_rows([r for r in rows if r["depth"] != depth], param_key, flops_per_token, used_budgets)
        interior = len(refit.used) == len(used_budgets) and all(f.status == "interior" for f in refit.used)
        result.refits.append((depth, refit.a, refit.b, refit.ratio, interior))
    for i, name in enumerate(("a", "b", "ratio"), start=1):
        values = [refit[i] for refit in result.refits if refit[i] is not None and refit[4]]
        if values:
            result.spread[name] = (min(values), max(values))
    at_edge = [refit[0] for refit in result.refits if refit[3] is not None and not refit[4]]
    if at_edge:
        result.notes.append(f"spread from {len(result.refits) - len(at_edge)} of {len(result.refits)} "
                            "leave-one-depth-out refits: leaving out "
                            + " or ".join(f"depth {d}" for d in at_edge)
                            + " puts an optimum at the edge of the depths left (an extrapolation)")
    return result


# -----------------------------------------------------------------------------
# Plots (PNG)

def _save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def _label(ax, xlabel, ylabel, title=None, logy=False, legend=True):
    """Log x axis (FLOPs or parameters), labels, a light grid, a small legend."""
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_isoflop(fit, path, param_label):
    """val bpb against N, one curve per budget: the points, the fitted parabola, its minimum (hollow: edge)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(fit.budgets))))
    for color, f in zip(colors, fit.budgets):
        ax.plot(f.params, f.bpb, "o", color=color, label=f"C = {f.budget:.3g} ({f.status})")
        if f.coefficients is not None:
            c2, c1, c0 = f.coefficients
            xs = np.linspace(math.log(f.params[0]) - 0.3, math.log(f.params[-1]) + 0.3, 100)
            ax.plot(np.exp(xs), c2 * xs ** 2 + c1 * xs + c0, "-", color=color, alpha=0.7)
        if f.n_opt is not None:
            ax.plot([f.n_opt], [f.bpb_opt], "*", markersize=14, color=color,
                    markerfacecolor=color if f.status == "interior" else "none")
    _label(ax, f"parameters N ({param_label})", "val bpb",
           "iso-FLOP curves (star: fitted minimum; hollow: at the edge, extrapolated)")
    _save(fig, path)


def plot_optimal(fit, path, param_label):
    """N*(C) and D*(C) on log-log axes with the fitted power laws (hollow points: edge budgets, not fitted)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    used = {f.budget for f in fit.used}
    for ax, attr, name, exponent in ((axes[0], "n_opt", f"N* ({param_label})", fit.a),
                                     (axes[1], "tokens_opt", "D* (tokens)", fit.b)):
        for f in fit.budgets:
            if getattr(f, attr) is not None:
                ax.plot([f.budget], [getattr(f, attr)], "o", color="C0",
                        markerfacecolor="C0" if f.budget in used else "none")
        if exponent is not None:
            cs = [f.budget for f in fit.used]
            _, coefficient = power_law(cs, [getattr(f, attr) for f in fit.used])
            xs = np.geomspace(min(cs), max(cs), 50)
            ax.plot(xs, coefficient * xs ** exponent, "-", color="C1", label=f"fit: ~ C^{exponent:.3f}")
        _label(ax, "training FLOPs C", name, logy=True)
    ratio = f", D*/N* = {fit.ratio:.1f}" if fit.ratio else ""
    fig.suptitle(f"compute-optimal size and tokens{ratio}")
    _save(fig, path)


def plot_frontier(fit, path):
    """The loss frontier: the best measured val bpb and the fitted minimum of each budget, against C."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    budgets = [f.budget for f in fit.budgets]
    ax.plot(budgets, [min(f.bpb) for f in fit.budgets], "o-", label="best measured")
    fitted = [(f.budget, f.bpb_opt) for f in fit.budgets if f.status == "interior"]
    if fitted:
        ax.plot(*zip(*fitted), "*--", markersize=10, label="fitted minimum (interior budgets)")
    _label(ax, "training FLOPs C", "val bpb", "loss frontier")
    _save(fig, path)


def plot_miniseries(rows, path, show_references):
    """CORE and val bpb of each depth against its training FLOPs; published CORE scores as labelled lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    rows = sorted(rows, key=lambda r: r["flops"])
    if show_references:
        for i, (name, score) in enumerate(CORE_REFERENCES):
            axes[0].axhline(score, linestyle="--", linewidth=1, color=f"C{i + 1}", label=f"{name}: {score}")
    title = "dashed: published GPT-2 scores (upstream nanochat, 22 tasks), not ours" if show_references else None
    for ax, key, name in ((axes[0], "core", "CORE"), (axes[1], "val_bpb", "val bpb")):
        points = [r for r in rows if r.get(key) is not None]
        ax.plot([r["flops"] for r in points], [r[key] for r in points], "o-", color="C0", label="nanochat (ours)")
        for r in points:
            ax.annotate(f"d{r['depth']}", (r["flops"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _label(ax, "training FLOPs", name, title if key == "core" else None)
    fig.suptitle("miniseries")
    _save(fig, path)
