"""
nanochat/scaling.py: the iso-FLOP fit recovers a known law, flags budgets whose optimum it did not find,
and the plots are written. scripts/scaling_laws.py itself is tested at toy size in test_scaling_laws.py.
"""

import math

import numpy as np
import pytest

from nanochat import scaling

BUDGETS = [1e15, 1e16, 1e17, 1e18]
SIZES = np.geomspace(1e6, 3e8, 9)  # one "depth" per size, the same at every budget, as in a real sweep


def rows_from(loss, budgets=BUDGETS, sizes=SIZES, flops_per_param=6.0):
    """Sweep rows from loss(N, C), with F = flops_per_param * N per token."""
    return [{"budget": c, "depth": i + 1, "params_no_embedding": n, "params": 2 * n,
             "flops_per_token": flops_per_param * n, "val_bpb": loss(n, c)}
            for c in budgets for i, n in enumerate(sizes)]


def test_fit_recovers_a_known_law_from_noisy_points():
    """
    N* = k C^0.5 with k chosen for 20 tokens per parameter (F = 6N, so D* = C/6N* and b = 1 - a), val bpb a
    parabola in ln N around it plus noise of 0.002 bpb. Stated tolerance: each N* within 10%, a and b within
    0.03, D*/N* within 15%; the leave-one-depth-out spread contains the estimate and is narrower than 0.1.
    """
    rng = np.random.default_rng(0)
    k = 1 / math.sqrt(120)  # C = 6 N D and D = 20 N give N = sqrt(C / 120)
    n_opt = lambda c: k * c ** 0.5
    loss = lambda n, c: 3.0 - 0.1 * math.log10(c) + 0.05 * math.log(n / n_opt(c)) ** 2 + rng.normal(0, 0.002)
    fit = scaling.fit_sweep(rows_from(loss))
    assert [f.status for f in fit.budgets] == ["interior"] * 4
    assert [note for note in fit.notes if not note.startswith("spread from 8 of 9")] == []  # 1e15 needs depth 1
    for f in fit.budgets:
        assert f.n_opt == pytest.approx(n_opt(f.budget), rel=0.10)
        assert f.tokens_opt == pytest.approx(f.budget / (6 * f.n_opt), rel=1e-9)  # D* = C / F(N*), F exact here
    assert fit.a == pytest.approx(0.5, abs=0.03) and fit.b == pytest.approx(0.5, abs=0.03)
    assert fit.ratio == pytest.approx(20, rel=0.15) and fit.ratio_6n == pytest.approx(fit.ratio, rel=1e-9)
    assert [depth for depth, *_ in fit.refits] == list(range(1, 10))
    for name, value in (("a", fit.a), ("b", fit.b)):
        low, high = fit.spread[name]
        assert low <= value <= high and high - low < 0.1
    low, high = fit.spread["ratio"]
    assert low <= fit.ratio <= high
    assert all(refit[4] for refit in fit.refits[1:-1])  # without an inner depth every optimum stays inside


def test_refits_that_put_an_optimum_at_the_edge_are_left_out_of_the_spread():
    """
    Four depths, the optimum nearest the second: without depth 1 the second is the smallest model left and still
    the best, so that refit is an extrapolation; it is listed, kept out of the spread, and a note names it.
    """
    n_opt = lambda c: (c / 120) ** 0.5
    law = lambda n, c: 3.0 - 0.1 * math.log10(c) + 0.05 * math.log(n / n_opt(c)) ** 2
    sizes = [2e6, 8e6, 3.2e7, 1.28e8]  # N*(1e16) = 9.1e6, N*(1e17) = 2.9e7: nearest depths 2 and 3
    rng = np.random.default_rng(2)
    fit = scaling.fit_sweep(rows_from(lambda n, c: law(n, c) + rng.normal(0, 0.003), [1e16, 1e17], sizes))
    assert [f.status for f in fit.budgets] == ["interior", "interior"]
    depth_1_out = fit.refits[0]
    assert depth_1_out[0] == 1 and depth_1_out[1] is not None and depth_1_out[4] is False  # 1e16: depth 2 at the edge
    kept = [refit for refit in fit.refits if refit[4]]
    assert kept and fit.spread["a"] == (min(r[1] for r in kept), max(r[1] for r in kept))
    assert any(note.startswith(f"spread from {len(kept)} of 4 leave-one-depth-out refits: leaving out depth 1 ")
               for note in fit.notes)


def test_fit_of_chinchilla_loss_matches_its_closed_form():
    """
    L = E + A/N^alpha + B/D^beta with D = C/6N (Chinchilla's fit, arXiv:2203.15556) has its iso-FLOP minimum at
    N* = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)). On upstream's grid shape (budgets
    1e18..1e19, sizes over 1.7 decades) the parabola fit, which only approximates that curve, lands within 5% of
    N* and 0.01 of the exponents.
    """
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    loss = lambda n, c: E + A / n ** alpha + B / (c / (6 * n)) ** beta
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    budgets = [1e18, 2.15e18, 4.64e18, 1e19]
    sizes = np.geomspace(2e7, 1e9, 8)
    fit = scaling.fit_sweep(rows_from(loss, budgets, sizes))
    assert all(f.status == "interior" for f in fit.budgets)
    for f in fit.budgets:
        assert f.n_opt == pytest.approx(G * (f.budget / 6) ** (beta / (alpha + beta)), rel=0.05)
    assert fit.a == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert fit.b == pytest.approx(alpha / (alpha + beta), abs=0.01)


def test_three_depths_give_a_fit_but_no_spread_and_say_so():
    """Three points fix each parabola exactly: the optimum is found, and the note says why no spread exists."""
    n_opt = lambda c: (c / 120) ** 0.5
    law = lambda n, c: 3.0 - 0.1 * math.log10(c) + 0.05 * math.log(n / n_opt(c)) ** 2
    sizes = [4e6, 1.6e7, 6.4e7]  # N*(1e16) = 9.1e6 and N*(1e17) = 2.9e7: both nearest the middle one
    fit = scaling.fit_sweep(rows_from(law, [1e16, 1e17], sizes))
    assert [f.status for f in fit.budgets] == ["interior", "interior"]
    assert [f.n_opt for f in fit.budgets] == pytest.approx([n_opt(1e16), n_opt(1e17)], rel=1e-9)
    assert fit.a == pytest.approx(0.5, abs=1e-9) and fit.spread == {}
    assert [refit[1:4] for refit in fit.refits] == [(None, None, None)] * 3
    assert any(note.startswith("no spread: a budget of three depths") for note in fit.notes)


def test_a_budget_whose_optimum_lies_outside_its_models_is_flagged_not_fit():
    """
    The smallest budget's optimum lies below every model (its best point is the smallest one): it is marked
    edge, named in a note as an extrapolation, and left out of a, b and the ratio. Too few points and a
    parabola that opens downwards are said as such.
    """
    n_opt = lambda c: (c / 120) ** 0.5
    loss = lambda n, c: 3.0 - 0.1 * math.log10(c) + 0.05 * math.log(n / n_opt(c)) ** 2
    sizes = np.geomspace(2e7, 3e8, 5)  # N*(1e15) = 2.9e6 and N*(1e16) = 9.1e6 lie below 2e7
    fit = scaling.fit_sweep(rows_from(loss, sizes=sizes))
    assert [f.status for f in fit.budgets] == ["edge", "edge", "interior", "interior"]
    assert [f.budget for f in fit.used] == [1e17, 1e18]
    assert fit.budgets[0].n_opt == pytest.approx(n_opt(1e15), rel=1e-6)  # exact parabola: the vertex is still right
    assert any("budget 1e+15: optimum not found (its best point is its smallest model)" in note and
               "extrapolation" in note and "smaller depths" in note for note in fit.notes)
    assert fit.a == pytest.approx(0.5, abs=1e-6)  # from the two interior budgets only
    # a single interior budget: no exponents, and the note says why
    fit = scaling.fit_sweep(rows_from(loss, budgets=[1e15, 1e17], sizes=sizes))
    assert fit.a is None and fit.b is None and fit.ratio == pytest.approx(20, rel=1e-6)
    assert any("exponents a and b need two" in note for note in fit.notes)
    # two points only, and a budget whose loss falls with N everywhere (a concave curve)
    assert scaling.fit_budget(1e15, [1e6, 2e6], [3.0, 2.9], lambda n: 6 * n).status == "too few points"
    concave = scaling.fit_budget(1e15, [1e6, 2e6, 4e6], [3.0, 2.99, 2.9], lambda n: 6 * n)
    assert concave.status == "no minimum" and concave.n_opt is None


def test_tokens_come_from_base_trains_flop_count_between_the_models():
    """F(N) is interpolated in log-log space between the measured models: exact at them, and exact everywhere
    (extrapolation included) for a power law; D* = C / F(N*)."""
    xs, ys = [1e6, 4e6, 1.6e7], [7e6, 2.6e7, 1.0e8]
    assert [scaling.interpolate_loglog(x, xs, ys) for x in xs] == pytest.approx(ys, rel=1e-12)
    power = lambda x: 3.0 * x ** 1.1
    for x in (5e5, 2e6, 1e7, 1e8):
        assert scaling.interpolate_loglog(x, xs, [power(v) for v in xs]) == pytest.approx(power(x), rel=1e-9)
    n = 2e6  # between the first two: F on the segment from (1e6, 7e6) to (4e6, 2.6e7)
    slope = math.log(2.6e7 / 7e6) / math.log(4)
    assert scaling.interpolate_loglog(n, xs, ys) == pytest.approx(7e6 * 2 ** slope, rel=1e-12)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 6])
def test_model_counts_follow_from_depth(depth):
    vocab, seq = 300, 64
    dim = 64 * depth
    heads = -(-dim // 128)
    params, no_embedding, flops = scaling.model_counts(depth, vocab, seq)
    assert params == 2 * vocab * dim + 12 * depth * dim ** 2  # wte, lm_head, then q,k,v,o and a 4x MLP per layer
    assert no_embedding == params - vocab * dim
    assert flops == 6 * no_embedding + 12 * depth * heads * (dim // heads) * seq


def test_depths_the_heads_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="depth 5 gives width 320, which its 3 heads do not divide: use depth 4 or 6"):
        scaling.model_counts(5, 300, 64)


def test_budget_tag():
    assert [scaling.budget_tag(c) for c in (1e13, 2.15e18, 4.64e18, 3e9, 1e5)] == \
        ["1e13", "2.15e18", "4.64e18", "3e9", "1e5"]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(tmp_path):
    n_opt = lambda c: (c / 120) ** 0.5
    loss = lambda n, c: 3.0 - 0.1 * math.log10(c) + 0.05 * math.log(n / n_opt(c)) ** 2
    fit = scaling.fit_sweep(rows_from(loss, sizes=np.geomspace(2e7, 3e8, 5)))  # edge budgets included
    scaling.plot_isoflop(fit, tmp_path / "isoflop.png", "parameters")
    scaling.plot_optimal(fit, tmp_path / "optimal.png", "parameters")
    scaling.plot_frontier(fit, tmp_path / "frontier.png")
    rows = [{"depth": d, "flops": 1e15 * d ** 3, "core": 0.01 * d, "val_bpb": 1.2 - 0.05 * d} for d in (2, 4)]
    scaling.plot_miniseries(rows, tmp_path / "miniseries.png", show_references=True)
    for name in ("isoflop.png", "optimal.png", "frontier.png", "miniseries.png"):
        assert is_png(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.png", "isoflop.png", "miniseries.png",
                                                          "optimal.png"]  # no temporary files left
