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
