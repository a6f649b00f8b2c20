"""GrowthSchedule: when the trainer grows, and that the decision survives a checkpoint."""
from staged_fast.schedule.growth_schedule import GrowthSchedule
from staged_fast.train_args import parse_args


def _args(*flags):
    return parse_args(["--size", "tiny_div2_width", *flags])


def test_fixed_updates_fire_once_each_in_order():
    s = GrowthSchedule(_args("--grow_at", "3,7", "--grow_ops", "width,alternate_id"), None, n_params=1, batch_tokens=1)
    assert [s.due(i) for i in (1, 2)] == [None, None]
    first = s.due(3)
    assert first.op == "width" and s.due(3) is None and s.due(6) is None
    assert s.due(9).op == "alternate_id" and s.due(10) is None and s.pending is None


def test_slope_rule_decision_and_its_curve_survive_a_checkpoint():
    args = _args("--grow_when", "slope", "--grow_ops", "width")
    curve = [(step, 10.0 * step ** -0.5 + 3.0) for step in range(10, 3000, 10)]
    straight = GrowthSchedule(args, None, n_params=1000, batch_tokens=64)
    fired_at = next(step for step, loss in curve if (straight.observe(step, loss), straight.fired)[1])
    # stop halfway to the firing point, checkpoint, rebuild, continue: fires at the same point
    half = [p for p in curve if p[0] < fired_at // 2]
    first = GrowthSchedule(args, None, n_params=1000, batch_tokens=64)
    for step, loss in half:
        first.observe(step, loss)
    resumed = GrowthSchedule(args, None, n_params=1000, batch_tokens=64, state=first.state_dict())
    rest = [p for p in curve if p[0] >= fired_at // 2]
    again = next(step for step, loss in rest if (resumed.observe(step, loss), resumed.fired)[1])
    assert again == fired_at
    assert resumed.due(123).op == "width" and resumed.pending is None
    resumed.grown(n_params=4000)
    assert resumed.state_dict() == {"next_growth": 1, "slope_points": []}


def _left(flags, step=0, iteration=0, done=0, grow_at=None):
    args = _args("--train_steps", "400", *flags)
    args.grow_at = grow_at or args.grow_at  # past the parser's check, as a resumed run from elsewhere may be
    s = GrowthSchedule(args, None, n_params=1000, batch_tokens=64, state={"next_growth": done})
    return s.updates_left(args, step, iteration)


def test_updates_left_counts_the_restarts_of_the_step_counter():
    assert _left([]) == (400, True)
    assert _left([], step=390, iteration=390) == (10, True)
    two = ["--grow_at", "100,300", "--grow_ops", "width,width"]
    assert _left(two) == (400, True)  # no --restart_steps: the counter goes on
    # R=50 at each growth: 100 updates to the first, 200 to the second, then 400 - 50
    assert _left([*two, "--restart_steps", "50"]) == (100 + 200 + 350, True)
    # auto: R = counter / 1.776 for width; 100 -> 56, then 56 + 200 = 256 -> 144
    assert _left([*two, "--restart_steps", "auto"]) == (300 + 400 - 144, True)
    # resumed after the first growth (counter 56 + 4 updates): the same end
    assert _left([*two, "--restart_steps", "auto"], step=60, iteration=104, done=1) == (556 - 104, True)


def test_updates_left_stops_at_a_growth_the_run_never_reaches_and_bounds_the_slope_rule():
    # resumed at 390 of 400 with a growth planned at update 500: the run ends first
    late = ["--grow_at", "100", "--restart_steps", "50"]
    assert _left(late, step=390, iteration=390, grow_at="500") == (10, True)
    # the slope rule's growth fires at an update not known in advance: a lower bound
    assert _left(["--grow_when", "slope", "--grow_ops", "width"], step=100, iteration=100) == (300, False)
