"""tucker_fx.planning.budget: the allocation step of budgeted compression, against brute force."""

import itertools
import math
import random

import pytest

from tucker_fx.planning.budget import Allocation, Option, allocate, budget_for, tighten

TOL = 1e-9


def random_options(rng: random.Random, integer: bool) -> dict[str, list[Option]]:
    """3-5 layers, 2-5 options each: leave-alone (original cost, loss 0) and 1-4 random ones (some
    dominated; integer instances have many ties)."""
    options = {}
    for l in range(rng.randint(3, 5)):
        name = f"l{l}"
        original = rng.randint(5, 20) if integer else rng.uniform(5, 20)
        layer = [Option(name, None, float(original), 0.0)]
        for k in range(rng.randint(1, 4)):
            cost = rng.randint(1, int(original)) if integer else rng.uniform(0.5, original)
            loss = rng.randint(0, 10) if integer else rng.uniform(0, 1)
            layer.append(Option(name, (k + 1, k + 2), float(cost), float(loss)))
        options[name] = layer
    return options


def brute_force(options, budget, fixed_cost=0.0):
    """The least total loss within the budget (None: nothing fits)."""
    best = None
    for combo in itertools.product(*options.values()):
        if math.fsum([fixed_cost] + [o.cost for o in combo]) <= budget:
            loss = math.fsum(o.loss for o in combo)
            best = loss if best is None else min(best, loss)
    return best


def cost_range(options, fixed_cost=0.0):
    lo = math.fsum([fixed_cost] + [min(o.cost for o in opts) for opts in options.values()])
    hi = math.fsum([fixed_cost] + [max(o.cost for o in opts) for opts in options.values()])
    return lo, hi


def layer_loss_range(opts):
    """Loss of the cheapest option (the least loss among the cheapest) minus the least loss: the
    undominated options' loss range."""
    cheapest = min(opts, key=lambda o: (o.cost, o.loss))
    return cheapest.loss - min(o.loss for o in opts)


def cases(seed, n=200, budgets=3):
    """n random option sets, each at `budgets` feasible budgets spread over its cost range (half of
    the sets with a fixed cost on top)."""
    rng = random.Random(seed)
    for t in range(n):
        options = random_options(rng, integer=t % 2 == 0)
        fixed = float(rng.choice([0, 0, 3, 7.5]))
        lo, hi = cost_range(options, fixed)
        for b in range(budgets):
            frac = (b + rng.random()) / budgets
            budget = lo + (hi - lo) * frac
            if t % 2 == 0:
                budget = float(math.floor(budget)) if math.floor(budget) >= lo else lo
            yield options, budget, fixed


def check_against_brute_force(exchange):
    n = off = 0
    for options, budget, fixed in cases(seed=0):
        a = allocate(options, budget, fixed_cost=fixed, exchange=exchange)
        opt = brute_force(options, budget, fixed)
        assert opt is not None and a.feasible
        assert a.total_cost <= budget
        assert a.total_cost == math.fsum([fixed] + [o.cost for o in a.choice.values()])
        assert a.total_loss == math.fsum(o.loss for o in a.choice.values())
        assert all(a.choice[name] in opts for name, opts in options.items())
        assert a.total_loss >= opt - TOL                      # nothing beats the optimum
        assert a.lower_bound <= opt + TOL                     # the dual bound is a bound
        assert a.total_loss - opt <= a.gap + TOL
        # the proven bound: within the largest single-layer loss range of the optimum
        assert a.total_loss - opt <= max(layer_loss_range(o) for o in options.values()) + TOL
        n += 1
        off += a.total_loss > opt + TOL
    return off, n


def test_allocate_against_brute_force(capsys):
    off, n = check_against_brute_force(exchange=False)
    with capsys.disabled():
        print(f"\nallocate: off the brute-force optimum on {off}/{n} = {off / n:.1%} of random cases")
    assert n == 600
    assert off / n <= 0.15


def test_allocate_with_exchange_against_brute_force(capsys):
    off, n = check_against_brute_force(exchange=True)
    with capsys.disabled():
        print(f"\nallocate(exchange=True): off the brute-force optimum on {off}/{n} = {off / n:.1%} of random cases")
    assert n == 600
    assert off / n <= 0.05


def test_exchange_never_worse_than_greedy():
    for options, budget, fixed in cases(seed=1, n=100):
        plain = allocate(options, budget, fixed_cost=fixed)
        better = allocate(options, budget, fixed_cost=fixed, exchange=True)
        assert better.total_cost <= budget
        assert better.total_loss <= plain.total_loss + TOL


def test_optimal_when_gap_is_zero():
    """gap == 0 certifies optimality; it is the common case on these instances."""
    certified = 0
    for options, budget, fixed in cases(seed=2, n=100):
        a = allocate(options, budget, fixed_cost=fixed)
        if a.gap <= TOL:
            certified += 1
            assert a.total_loss == pytest.approx(brute_force(options, budget, fixed), abs=TOL)
    assert certified > 0


def test_monotone_in_budget():
    """Along a sweep of budgets the loss never rises; lam and the lower bound never rise either."""
    rng = random.Random(3)
    for t in range(60):
        options = random_options(rng, integer=t % 2 == 0)
        lo, hi = cost_range(options)
        prev = None
        for k in range(61):
            a = allocate(options, lo + (hi - lo) * k / 60 if k < 60 else hi)
            assert a.feasible
            if prev is not None:
                assert a.total_loss <= prev.total_loss + TOL
                assert a.lam <= prev.lam
                assert a.lower_bound <= prev.lower_bound + TOL
            prev = a
        assert prev.total_loss == sum(min(o.loss for o in opts) for opts in options.values())


def test_infeasible_returns_the_cheapest_choice():
    options = {
        "a": [Option("a", None, 10.0, 0.0), Option("a", (2,), 4.0, 0.5), Option("a", (1,), 4.0, 0.7)],
        "b": [Option("b", None, 6.0, 0.0), Option("b", (3, 3), 2.0, 0.2)],
    }
    a = allocate(options, budget=5.9)  # cheapest total: 4 + 2 = 6
    assert a.feasible is False
    assert a.ranks == {"a": (2,), "b": (3, 3)}  # of the two cheapest for "a", the lower loss
    assert (a.total_cost, a.total_loss, a.lam, a.lower_bound) == (6.0, 0.7, math.inf, math.inf)
    assert allocate(options, budget=6.0).feasible is True
    b = allocate(options, budget=10.0, fixed_cost=4.5)  # the fixed cost alone takes 4.5 of it
    assert (b.feasible, b.ranks, b.total_cost) == (False, {"a": (2,), "b": (3, 3)}, 10.5)
    assert "INFEASIBLE" in a.table()


def test_generous_budget_takes_every_lowest_loss_option():
    rng = random.Random(4)
    for t in range(50):
        options = random_options(rng, integer=t % 2 == 0)
        _, hi = cost_range(options, 2.0)
        for budget in (hi, hi + 1.0, math.inf):
            a = allocate(options, budget, fixed_cost=2.0)
            assert a.feasible and a.lam == 0.0 and a.gap == 0.0
            for name, opts in options.items():
                best = min(opts, key=lambda o: (o.loss, o.cost))
                assert (a.choice[name].loss, a.choice[name].cost) == (best.loss, best.cost)


def test_single_layer_is_exact():
    opts = [Option("x", None, 9.0, 0.0), Option("x", (6,), 6.0, 0.1), Option("x", (4,), 4.0, 0.15),
            Option("x", (3,), 3.5, 0.9), Option("x", (2,), 2.0, 1.0)]
    for budget, ranks in [(2.0, (2,)), (3.9, (3,)), (4.0, (4,)), (8.9, (6,)), (9.0, None), (99.0, None)]:
        assert allocate({"x": opts}, budget).choice["x"].ranks == ranks


def test_dominated_options_never_chosen():
    options = {"a": [Option("a", None, 10.0, 0.0), Option("a", (8,), 7.0, 0.5), Option("a", (9,), 8.0, 0.6),
                     Option("a", (4,), 3.0, 0.9)]}
    chosen = {allocate(options, b / 2).choice["a"].ranks for b in range(6, 22)}
    assert chosen == {(4,), (8,), None}


def test_ties_are_deterministic():
    # two options with the same (cost, loss): the first given is the one chosen, every time
    options = {"a": [Option("a", None, 4.0, 0.0), Option("a", (2,), 2.0, 0.3), Option("a", (3,), 2.0, 0.3)],
               "b": [Option("b", None, 4.0, 0.0), Option("b", (5,), 2.0, 0.3)]}
    results = [allocate(options, 6.0) for _ in range(3)]
    assert all(r == results[0] for r in results)
    # the two upgrades save the same per unit of cost: the earlier layer gets the budget
    assert results[0].ranks == {"a": None, "b": (5,)}
    assert allocate(options, 4.0).ranks == {"a": (2,), "b": (5,)}


def test_greedy_reaches_options_off_the_hull():
    # (6, 0.5) lies above the hull between (2, 1.0) and (10, 0.0); the relaxation alone cannot pick it
    options = {"a": [Option("a", None, 10.0, 0.0), Option("a", (4,), 6.0, 0.5), Option("a", (2,), 2.0, 1.0)]}
    a = allocate(options, 7.0)
    assert a.ranks == {"a": (4,)} and a.total_loss == 0.5
    assert a.lam > 0 and a.lower_bound < 0.5


def test_allocation_table():
    options = {"conv1": [Option("conv1", None, 12.5, 0.0, "keep"), Option("conv1", (16, 8), 4.25, 0.03, "vbmf")],
               "fc": [Option("fc", None, 3.0, 0.0), Option("fc", (10,), 1.0, 0.2)]}
    a = allocate(options, 10.0, fixed_cost=1.5)
    assert isinstance(a, Allocation)
    assert a.table() == "\n".join([
        "layer  ranks    cost  loss  label",
        "conv1  (16, 8)  4.25  0.03  vbmf",
        "fc     -           3     0",
        "fixed            1.5",
        "total           8.75  0.03  (budget 10, feasible)",
    ])


def test_budget_for():
    assert budget_for(1.0, 80.0) == 80.0
    assert budget_for(2.5, 80.0) == 32.0
    for ratio in (0.5, 0.999, -2.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="target_ratio"):
            budget_for(ratio, 80.0)
    for total in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="total_before"):
            budget_for(2.0, total)
    with pytest.raises(TypeError, match="target_ratio must be a number"):
        budget_for("2", 80.0)


def test_tighten():
    assert tighten(10.0, measured_total=12.5, predicted_total=10.0) == pytest.approx(7.84)
    assert tighten(10.0, measured_total=20.0, predicted_total=10.0, margin=0.0) == 5.0
    assert tighten(10.0, measured_total=8.0, predicted_total=10.0, margin=0.0) == 10.0  # never looser
    assert tighten(10.0, measured_total=8.0, predicted_total=10.0) == pytest.approx(9.8)
    assert tighten(1e-300, measured_total=1e300, predicted_total=1.0) >= 0.0
    for kwargs, word in [({"budget": 0.0}, "budget"), ({"measured_total": 0.0}, "measured_total"),
                         ({"predicted_total": -1.0}, "predicted_total"), ({"margin": 1.0}, "margin"),
                         ({"margin": -0.1}, "margin")]:
        args = {"budget": 10.0, "measured_total": 12.0, "predicted_total": 10.0, **kwargs}
        with pytest.raises(ValueError, match=word):
            tighten(**args)


def test_allocate_measure_tighten_loop():
    """The measured cost runs 30% over the prediction: a few rounds of tighten meet the target."""
    rng = random.Random(5)
    options = random_options(rng, integer=False)
    _, hi = cost_range(options)
    target = budget_for(1.6, hi)
    budget = target
    for round_ in range(5):
        a = allocate(options, budget)
        measured = 1.3 * a.total_cost
        if measured <= target:
            break
        budget = tighten(target, measured, a.total_cost)
    assert measured <= target and round_ <= 2


def test_option_validation():
    assert Option("a", [2, 3], 1, 0).ranks == (2, 3)
    with pytest.raises(ValueError, match="cost must be finite and >= 0, got -1.0"):
        Option("a", (2,), -1.0, 0.0)
    with pytest.raises(ValueError, match="loss must be finite and >= 0, got -0.5"):
        Option("a", (2,), 1.0, -0.5)
    with pytest.raises(ValueError, match="loss must be finite"):
        Option("a", (2,), 1.0, math.inf)
    with pytest.raises(ValueError, match="got nan"):
        Option("a", (2,), math.nan, 0.0)
    with pytest.raises(TypeError, match="cost must be a number"):
        Option("a", (2,), "1", 0.0)
    with pytest.raises(ValueError, match="ranks must be a tuple of positive ints or None"):
        Option("a", (0, 2), 1.0, 0.0)
    with pytest.raises(ValueError, match="ranks must be a tuple of positive ints or None"):
        Option("a", (), 1.0, 0.0)
    with pytest.raises(ValueError, match="layer name"):
        Option("", None, 1.0, 0.0)


def test_allocate_errors():
    good = {"a": [Option("a", None, 2.0, 0.0)]}
    with pytest.raises(ValueError, match="options is empty"):
        allocate({}, 1.0)
    with pytest.raises(ValueError, match="layer 'b' has no options"):
        allocate({**good, "b": []}, 1.0)
    for budget in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="budget must be"):
            allocate(good, budget)
    with pytest.raises(ValueError, match="fixed_cost must be finite and >= 0"):
        allocate(good, 1.0, fixed_cost=-1.0)
    with pytest.raises(ValueError, match="holds an option for layer 'a'; expected 'b'"):
        allocate({"b": [Option("a", None, 2.0, 0.0)]}, 1.0)
    with pytest.raises(TypeError, match="must hold Option objects"):
        allocate({"a": [("a", None, 2.0, 0.0)]}, 1.0)
    with pytest.raises(TypeError, match="sequence of Option"):
        allocate({"a": Option("a", None, 2.0, 0.0)}, 1.0)
    with pytest.raises(TypeError, match="options must be a mapping"):
        allocate([Option("a", None, 2.0, 0.0)], 1.0)
