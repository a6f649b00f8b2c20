"""metrics.jsonl and TensorBoard after a requeue: what an earlier attempt logged past the resumed update goes."""
import json

from staged_fast.metrics import MetricsLogger, read_metrics


def _records(first: int, last: int, attempt: int) -> list[dict]:
    # the step counter moves back at a growth with --restart_steps (here after update 3): TensorBoard's axis
    # is the update, which only grows
    return [{"iteration": i, "step": i if i <= 3 else i - 2, "loss": 10.0 * attempt + i} for i in range(first, last + 1)]


def test_a_resumed_logger_keeps_one_record_per_update_in_the_log_and_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path, tensorboard=True, keep_until=0)
    for record in _records(1, 6, attempt=1):  # killed after update 6; its last checkpoint was at update 4
        first.log(record)
    first.close()
    again = MetricsLogger(tmp_path, tensorboard=True, keep_until=4)
    assert again.dropped == 2
    for record in _records(5, 7, attempt=2):
        again.log(record)
    again.close()
    assert [(r["iteration"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0), (7, 27.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0), (7, 27.0)]
    assert [e.value for e in events.Scalars("step")] == [1, 2, 3, 2, 3, 4, 5]


def test_a_checkpoint_saved_with_its_validation_pending_drops_that_updates_later_records(tmp_path):
    """The validation and growth of update 4 came after its checkpoint (the validation was cut short): the
    resumed run does them again, so their records of the earlier attempt go, the training record stays."""
    lines = [{"iteration": 3, "loss": 1.0}, {"iteration": 4, "loss": 0.9},
             {"event": "validation", "iteration": 4, "resumed": True}, {"event": "growth", "iteration": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    logger = MetricsLogger(tmp_path, keep_until=4, pending=True)
    assert logger.dropped == 2
    assert read_metrics(tmp_path / "metrics.jsonl") == lines[:2]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert MetricsLogger(tmp_path, keep_until=4).dropped == 0  # not pending: they belong to the checkpoint


def test_the_line_count_a_checkpoint_keeps_says_exactly_where_to_cut(tmp_path):
    """A --doubling from a checkpoint with its validation pending grows and logs the growth, then saves (still
    pending): cut by update and event, the growth record went, and nothing logged it again. Checkpoints keep the
    file's line count at their save; that count decides where one is given."""
    lines = [{"iteration": 2, "loss": 1.0}, {"event": "growth", "iteration": 2},
             {"event": "validation", "iteration": 2, "resumed": True}, {"iteration": 3, "loss": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    logger = MetricsLogger(tmp_path, keep_until=2, pending=True, keep_lines=2)
    assert (logger.dropped, logger.lines) == (2, 2)
    assert read_metrics(tmp_path / "metrics.jsonl") == lines[:2]
    logger.log({"iteration": 3, "loss": 0.8})
    assert logger.lines == 3 == len(read_metrics(tmp_path / "metrics.jsonl"))
