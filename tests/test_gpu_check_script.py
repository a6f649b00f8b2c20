"""benchmarks/gpu_check.sh, the one prepared command a lent GPU machine runs (540 seconds at most):
its default steps' limits fit its budget, in the issue's priority order; a failing step is recorded and
the run goes on, and a step that no longer fits is skipped, both in the summary."""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CALL_LIMIT_S = 540  # the device tool's limit for one command


def _script():
    text = SCRIPT.read_text()
    budget = int(re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET:-(\d+)\}", text).group(1))
    default_steps = re.search(r'STEPS=\$\{GPU_CHECK_STEPS:-"([^"]+)"\}', text).group(1).split()
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^step (\w+) (\d+) ", text, re.M)}
    order = list(limits)  # the step lines in the order the script runs them
    install_limit = int(re.search(r"MAX_JOBS=\d+ timeout (\d+) ", text).group(1))
    return text, budget, default_steps, limits, order, install_limit


def test_default_step_limits_sum_under_the_budget():
    text, budget, default_steps, limits, order, install_limit = _script()
    assert budget + 10 <= CALL_LIMIT_S  # the summary and the last kill margin fit too
    missing = [s for s in default_steps if s != "install" and s not in limits]
    assert not missing, f"default steps without a step line: {missing}"
    assert sum(limits[s] for s in default_steps if s != "install") <= budget, limits
    # install runs in the background until the step that needs the extension waits for it; its limit
    # must sit under the steps that run beside it, or its wait would add to the sum.
    beside = order[:order.index("tests_ext")]
    assert install_limit <= sum(limits[s] for s in beside if s in default_steps)
    assert "install_wait\nstep tests_ext" in text


def test_default_steps_run_in_the_issues_priority_order():
    _, _, default_steps, _, order, _ = _script()
    ran = [s for s in order if s in default_steps]
    assert ran == [s for s in default_steps if s != "install"], "STEPS lists the steps in the order they run"
    priority = ["env", "install", "tests_kernels", "bench_kernels", "bench_train", "bench_growth", "tests_rest"]
    positions = [default_steps.index(s) for s in priority]
    assert positions == sorted(positions)
    assert default_steps[-1] == "tests_rest"


def _run(tmp_path, steps, budget, hang_on=None, slow=None, prints=(), env=None):
    """gpu_check.sh with PYTHON a stand-in that says what it was asked and exits 3 (the same on any
    machine, GPU or not): the script's own bookkeeping is what is tested. A call whose arguments contain
    `hang_on` instead waits to be interrupted, and says which signal reached it; with slow=(text, s), a call
    whose arguments contain text takes s seconds first; prints: (text, line) pairs, a line such a call prints."""
    fake = tmp_path / "fake_python"
    hang = (f'case "$*" in *{hang_on}*) trap \'echo "fake python: got SIGINT"; exit 130\' INT; '
            f'trap \'echo "fake python: got SIGTERM"; exit 143\' TERM; sleep 60 & wait $!;; esac\n' if hang_on else "")
    if slow:
        hang += f'case "$*" in *{slow[0]}*) sleep {slow[1]};; esac\n'
    for text, line in prints:
        hang += f'case "$*" in *{text}*) echo "{line}";; esac\n'
    fake.write_text('#!/bin/sh\necho "fake python: $*"\n'
                    'echo "fake autotune: attn=${STAGED_FAST_ATTN_AUTOTUNE-on} norm=${STAGED_FAST_NORM_AUTOTUNE-on}"\n'
                    + hang + 'exit 3\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_STEPS": steps, "GPU_CHECK_BUDGET": str(budget),
           "PYTHON": str(fake), "TRITON_CACHE_DIR": str(tmp_path / "triton_cache"),
           "TRITON_SEED": str(tmp_path / "no_seed"), **(env or {})}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
    return proc, out


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    _, out = _run(tmp_path, "host_overhead bench_growth", 530)
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^host_overhead\s+FAIL\(3\)", summary, re.M), summary
    assert re.search(r"^bench_growth\s+FAIL\(3\)", summary, re.M), summary
    log = (out / "steps.log").read_text()
    assert "fake python: benchmarks/host_overhead.py --device cuda" in log
    assert "fake python: benchmarks/bench_growth.py --device cuda" in log


# The three runs below mostly wait (a stand-in step sleeping 12-17 s): they run side by side, once per module.
WAITING_RUNS = {
    "timeout": (("host_overhead bench_kernels_dq", 530), dict(hang_on="host_overhead")),
    "handed_on": (("profile host_overhead", 530), dict(slow=("host_overhead", 17))),
    "install_wait": (("install tests_kernels tests_ext", 530), dict(slow=("no-build-isolation", 12))),
}


@pytest.fixture(scope="module")
def waiting_runs(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(WAITING_RUNS)) as pool:
        futures = {name: pool.submit(_run, tmp_path_factory.mktemp(name), *args, **kwargs)
                   for name, (args, kwargs) in WAITING_RUNS.items()}
        return {name: future.result() for name, future in futures.items()}


def test_a_step_over_its_limit_is_interrupted_and_marked_timeout(waiting_runs):
    """Past its limit a step gets SIGINT (pytest then prints its failures and durations so far, a benchmark
    where it was), and the summary says TIMEOUT; the next step still runs."""
    _, out = waiting_runs["timeout"]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^host_overhead\s+TIMEOUT\s+1[5-9]s", summary, re.M), summary
    assert re.search(r"^bench_kernels_dq\s+FAIL\(3\)", summary, re.M), summary
    assert "fake python: got SIGINT" in (out / "steps.log").read_text()


def test_a_step_may_spend_what_earlier_steps_left_of_their_limits(waiting_runs):
    """The limits are estimates: profile (15 s) ends at once, so host_overhead (15 s) may run 15 s more and
    is not cut off at 17 s."""
    _, out = waiting_runs["handed_on"]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^host_overhead\s+FAIL\(3\)\s+1[7-9]s", summary, re.M), summary
    assert re.search(r"=== host_overhead \(limit (\d+)s", (out / "steps.log").read_text()).group(1) in {"29", "30"}


def test_time_spent_waiting_outside_a_step_is_not_handed_on(waiting_runs):
    """The extension's build runs in the background beside the first steps; the wait for it before
    tests_ext spends seconds that tests_kernels left, so tests_ext may not be given them again."""
    _, out = waiting_runs["install_wait"]
    limit = int(re.search(r"=== tests_ext \(limit (\d+)s", (out / "steps.log").read_text()).group(1))
    assert 20 + 100 - 14 <= limit <= 20 + 100 - 12, limit  # its own 20 s + tests_kernels' 100 less the wait


def test_the_summary_keeps_each_measured_row_of_a_cut_off_bench_train_and_of_bench_growth(tmp_path):
    """bench_train prints each row as it is measured (its table comes at the end, lost when the step is cut
    off); bench_growth's rows matched none of the summary's patterns (only its table headers did)."""
    rows = [("bench_train.py", "ours_triton: 61.0 ms/step, 268590 tokens/s, 1.79x HF SDPA"),
            ("bench_growth.py", "GPT2_large_div2_width | width | fused | 0.157"),
            ("bench_growth.py", "c_attn 2304x768 | 4.25 | 44.9 | 10.6 | 25")]
    _, out = _run(tmp_path, "bench_train bench_growth", 530, prints=rows)
    summary = (out / "summary.txt").read_text()
    for _, line in rows:
        assert line in summary, summary


def test_a_step_that_no_longer_fits_is_skipped_and_said_so(tmp_path):
    proc, out = _run(tmp_path, "tests_rest", 20)  # 20 s less the 10 s margin: under a step's 20 s minimum
    assert re.search(r"^tests_rest\s+SKIPPED", (out / "summary.txt").read_text(), re.M)
    assert "tests_rest skipped" in proc.stdout


def test_every_default_step_reaches_its_command_whole(tmp_path):
    """A dry run of the default steps with the stand-in python: each step ran (FAIL(3): the stand-in's
    exit, not 127 from a command split by a stray newline, as fsdp_nccl's once was), and the training
    commands it would run are valid command lines of staged_fast.train."""
    from staged_fast.train_args import parse_args, validate

    default_steps = _script()[2]
    _, out = _run(tmp_path, " ".join(default_steps), 530)
    summary = (out / "summary.txt").read_text()
    for step in default_steps:
        expected = r"FAIL\(\d+\)" if step == "env" else r"FAIL\(3\)"  # env: nvidia-smi may be missing first
        assert re.search(rf"^{step}\s+{expected}\s", summary, re.M), (step, summary)
    lines = (out / "steps.log").read_text().splitlines()
    train_at = [i for i, line in enumerate(lines) if line.startswith("fake python: -m staged_fast.train")]
    calls = [lines[i].split("fake python: ", 1)[1].split() for i in train_at]
    assert calls and all("--stop_at_step" in c or "--resume" in c for c in calls)
    # fsdp_nccl checks correctness: its processes run the default configs, as the tests do
    assert all(lines[i + 1] == "fake autotune: attn=0 norm=0" for i in train_at), [lines[i + 1] for i in train_at]
    for argv in calls:  # cpu for cuda: validate() checks that the device exists, the rest is the same
        validate(parse_args(["cpu" if a == "cuda" else a for a in argv[2:]]))
    # tests_rest leaves out what earlier steps ran and the no-GPU compile checks (the GPU compiles for real)
    pytest_at = [i for i, line in enumerate(lines) if line.startswith("fake python: -m pytest")]
    pytest_calls = [lines[i].split("fake python: ", 1)[1].split() for i in pytest_at]
    # the tests run each kernel's default config (each autotuner has its own test, which turns it on)
    assert all(lines[i + 1] == "fake autotune: attn=0 norm=0" for i in pytest_at), [lines[i + 1] for i in pytest_at]
    rest = next(c for c in pytest_calls if "tests" in c)
    ignored = {a.split("=", 1)[1] for a in rest if a.startswith("--ignore=")}
    earlier = {a for c in pytest_calls if c is not rest for a in c if a.startswith("tests/")}
    no_gpu_compiles = {"tests/test_kernels_compile_gpu.py", "tests/test_triton_seed.py"}
    assert earlier and earlier | no_gpu_compiles == ignored, (earlier, ignored)


def test_a_carried_triton_seed_is_unpacked_checked_and_reported(tmp_path):
    """Before the first step the seed is unpacked into Triton's cache and checked; the summary ends with the
    check's verdict and the report of what compiled anyway (the subcommands themselves:
    tests/test_triton_seed.py)."""
    seed, cache = tmp_path / "seed", tmp_path / "triton_cache"
    proc, out = _run(tmp_path, "env", 530, env={"TRITON_SEED": str(seed), "TRITON_CACHE_DIR": str(cache)})
    log = (out / "steps.log").read_text()
    unpack = log.index(f"fake python: benchmarks/triton_seed.py unpack {seed} {cache}")
    check = log.index(f"fake python: benchmarks/triton_seed.py check {seed}")
    assert unpack < check < log.index("=== env")
    summary = (out / "summary.txt").read_text()
    assert f"fake python: benchmarks/triton_seed.py report {cache}" in summary, summary
