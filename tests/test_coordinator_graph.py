"""Graph descriptions compile to plans; bad graphs fail before anything runs."""

from __future__ import annotations

import pytest

from pydotcompute.coordinator import DAG, FanIn, FanOut, Pipeline, RetryPolicy, route, stage
from pydotcompute.coordinator.plan import compile_graph
from pydotcompute.errors import InvalidConfigurationError


def inc(x):
    return x + 1


def dbl(x):
    return x * 2


def test_rshift_and_pipeline_flatten_nested_pipelines():
    a, b, c = stage(inc), stage(dbl), stage(inc, name="again")
    p = a >> (b >> c)
    assert isinstance(p, Pipeline)
    assert [s.name for s in p.steps] == ["inc", "dbl", "again"]
    assert [s.name for s in Pipeline(a, Pipeline(b, c)).steps] == ["inc", "dbl", "again"]
    # a plain function on the left works too
    assert [s.name for s in (inc >> b).steps] == ["inc", "dbl"]


def test_stage_options_and_retry_policy_validation():
    st = stage(workers=3, buffer=8, retries=4, backoff=0.1, retry_on=(ValueError,))(inc)
    assert (st.workers, st.buffer, st.retry.attempts, st.retry.retry_on) == (3, 8, 4, (ValueError,))
    assert st(1) == 2  # still callable
    with pytest.raises(InvalidConfigurationError):
        stage(inc, workers=0)
    with pytest.raises(InvalidConfigurationError):
        stage(inc, buffer=0)
    with pytest.raises(InvalidConfigurationError):
        RetryPolicy(attempts=0)
    with pytest.raises(InvalidConfigurationError):
        stage("kernel", processes=True)
    with pytest.raises(InvalidConfigurationError):
        FanOut(inc, mode="random")


def test_retry_delay_grows_exponentially_with_jitter_and_cap():
    p = RetryPolicy(attempts=10, backoff=0.1, factor=2, max_backoff=0.5, jitter=0.5)
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (8, 0.5)]:
        delays = [p.delay(attempt) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in delays)
        assert max(delays) - min(delays) > 0  # jitter spreads them
    assert p.should_retry(1, ValueError()) and not p.should_retry(10, ValueError())
    only = RetryPolicy(attempts=3, retry_on=(KeyError,))
    assert only.should_retry(1, KeyError()) and not only.should_retry(1, ValueError())


def test_dag_with_cycle_or_unknown_step_is_rejected_before_running():
    d = DAG().add("a", inc).add("b", dbl, after=["a", "c"]).add("c", inc, after="b")
    with pytest.raises(InvalidConfigurationError, match="cycle"):
        compile_graph(d)
    d = DAG().add("a", inc).add("b", dbl, after="nope")
    with pytest.raises(InvalidConfigurationError, match="unknown"):
        compile_graph(d)
    with pytest.raises(InvalidConfigurationError, match="twice"):
        DAG().add("a", inc).add("a", dbl)
    d = DAG().add("a", inc).add("b", dbl, after="a").add("c", inc, after="a")
    with pytest.raises(InvalidConfigurationError, match="last step"):
        compile_graph(d)


def test_fan_in_without_broadcast_or_batching_is_rejected():
    with pytest.raises(InvalidConfigurationError):
        compile_graph(stage(inc) >> FanIn(sum))
    with pytest.raises(InvalidConfigurationError):
        compile_graph(FanOut(inc, dbl) >> FanIn(sum))
    with pytest.raises(InvalidConfigurationError):
        FanIn(count=3)  # batching needs a merge


def test_plan_shapes_and_fingerprint():
    g = (
        stage(inc)
        >> FanOut(inc, dbl, mode="broadcast")
        >> FanIn(sum)
        >> route(lambda v: v > 3, dbl)
    )
    plan = compile_graph(g)
    kinds = sorted(n.kind for n in plan.nodes)
    assert kinds.count("split") == 2 and kinds.count("sink") == 1
    join = next(n for n in plan.nodes if n.parts == 2)
    assert join.name == "sum"
    same = compile_graph(
        stage(inc)
        >> FanOut(inc, dbl, mode="broadcast")
        >> FanIn(sum)
        >> route(lambda v: v > 3, dbl)
    )
    assert same.fingerprint == plan.fingerprint
    other = compile_graph(stage(inc) >> FanOut(inc, dbl, mode="broadcast") >> FanIn(sum))
    assert other.fingerprint != plan.fingerprint
    # duplicate stage names get a suffix so each node has its own name
    names = compile_graph(stage(inc) >> inc >> inc).stage_names
    assert len(set(names)) == len(names)
