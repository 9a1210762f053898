"""Chaos specs: parsing, validation messages, format round trip, one-shot firing across restarts."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacluster.errors import InputError
from megacluster.train import chaos
from megacluster.train.chaos import Chaos, Fault, parse

EXAMPLE = "kill:rank=1,step=60; hang:rank=2,step=120; flap:step=150; slow:rank=0,factor=3"


def test_parse_example():
    faults = parse(EXAMPLE)
    assert faults == [
        Fault(kind="kill", rank=1, step=60, id="kill-r1-s60"),
        Fault(kind="hang", rank=2, step=120, id="hang-r2-s120"),
        Fault(kind="flap", rank=None, step=150, id="flap-s150"),
        Fault(kind="slow", rank=0, step=0, factor=3.0, id="slow-r0-s0"),
    ]


def test_parse_permanent_and_whitespace_and_empty():
    (f,) = parse("  kill : rank = 1 , step = 50 , permanent ;  ")
    assert f.permanent and f.rank == 1 and f.step == 50 and f.id == "kill-r1-s50"
    assert parse("") == [] and parse(None) == [] and parse(" ; ") == []


@pytest.mark.parametrize(
    "spec, bad",
    [
        ("boom:rank=1,step=2", "boom"),
        ("kill:rank=1,step=2,speed=3", "speed"),
        ("kill:rank=-1,step=2", "rank"),
        ("kill:rank=1.5,step=2", "rank"),
        ("kill:rank=1,step=x", "step"),
        ("kill:rank=1", "needs step"),
        ("slow:rank=0,factor=0.5", "factor"),
        ("slow:rank=0,factor=inf", "factor"),
        ("slow:rank=0,factor=abc", "factor"),
        ("slow:rank=0,factor=1e300", "factor must be a number from 1 to 1e+06"),  # time.sleep overflowed
        ("kill:rank=1,step=2,down=1e300", "down must be a number of seconds from 0 to 1e+06"),
        ("hang:rank=0,step=3,permanent", "permanent"),
        ("kill:step=3,permanent", "permanent"),
        ("kill:rank=0,step=3,permanent=yes", "permanent"),
        ("kill:rank=0,step", "step"),
        ("flap:rank=0,step=3", "rank"),
        ("kill:rank=1,rank=2,step=3", "twice"),
        ("kill:rank=1,step=3; kill:rank=1,step=3,permanent", "duplicate"),
    ],
)
def test_bad_specs_name_flag_part_and_grammar(spec, bad):
    with pytest.raises(InputError) as e:
        parse(spec)
    msg = str(e.value)
    assert msg.startswith("--chaos")
    assert bad in msg
    assert "kill, hang, flap, slow" in msg


def test_fault_validates_direct_construction():
    with pytest.raises(InputError):
        Fault(kind="slow", rank=0, step=0, factor=0.9)
    with pytest.raises(InputError):
        Fault(kind="kill", rank=0, step=1, factor=2.0)
    assert Fault(kind="slow", rank=None, step=5, factor=2.0).id == "slow-s5"


fault_st = st.one_of(
    st.builds(
        lambda r, s, p: Fault(kind="kill", rank=r if (r is not None or not p) else 0, step=s, permanent=p),
        st.none() | st.integers(0, 99),
        st.integers(0, 10_000),
        st.booleans(),
    ),
    st.builds(lambda r, s: Fault(kind="hang", rank=r, step=s), st.none() | st.integers(0, 99), st.integers(0, 10**6)),
    st.builds(lambda s, n: Fault(kind="flap", rank=None, step=s, times=n), st.integers(0, 10**6), st.integers(1, 9)),
    st.builds(
        lambda r, s, x: Fault(kind="slow", rank=r, step=s, factor=x),
        st.none() | st.integers(0, 99),
        st.integers(0, 1000),
        st.floats(min_value=1, max_value=1e6, allow_nan=False),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(fault_st, max_size=6, unique_by=lambda f: f.id))
def test_format_round_trips(faults):
    text = chaos.format(faults)
    assert parse(text) == faults
    assert chaos.format(parse(text)) == text


def test_one_shot_fires_once_across_restarts(tmp_path):
    faults = parse("kill:rank=1,step=60; hang:rank=2,step=120")
    first = Chaos(faults, rank=1, marker_dir=tmp_path)
    assert first.due(59, "kill") is None
    assert first.due(60, "hang") is None  # the hang is rank 2's
    f = first.due(60, "kill")
    assert f is not None and f.id == "kill-r1-s60"
    first.fire(f)
    assert first.due(60, "kill") is None
    restarted = Chaos(faults, rank=1, marker_dir=tmp_path)  # new process after the kill, same run directory
    assert restarted.due(60, "kill") is None
    other = Chaos(faults, rank=2, marker_dir=tmp_path)
    assert other.take(120, "hang").id == "hang-r2-s120"
    assert Chaos(faults, rank=2, marker_dir=tmp_path).due(120, "hang") is None
    assert not list(tmp_path.glob(".*tmp*"))  # markers written atomically, no leftovers


def test_fault_on_all_ranks_fires_once_per_rank(tmp_path):
    faults = parse("flap:step=5; kill:step=7")
    ranks = [Chaos(faults, rank=r, marker_dir=tmp_path) for r in range(3)]
    for c in ranks:
        assert c.take(5, "flap") is not None
        assert c.take(7, "kill") is not None
    assert all(Chaos(faults, rank=r, marker_dir=tmp_path).due(5, "flap") is None for r in range(3))


def test_in_memory_without_marker_dir():
    c = Chaos(parse("kill:rank=0,step=1"), rank=0, marker_dir=None)
    assert c.take(1, "kill") is not None
    assert c.due(1, "kill") is None
    assert Chaos(parse("kill:rank=0,step=1"), rank=0, marker_dir=None).due(1, "kill") is not None


def test_slow_factor_is_persistent_and_multiplies():
    c = Chaos(parse("slow:rank=0,factor=3; slow:step=10,factor=2; slow:rank=1,factor=5"), rank=0, marker_dir=None)
    assert c.slow_factor(0) == 3.0
    assert c.slow_factor(9) == 3.0
    assert c.slow_factor(10) == 6.0
    assert c.slow_factor(10_000) == 6.0
    assert Chaos([], rank=0, marker_dir=None).slow_factor(3) == 1.0
    with pytest.raises(ValueError):
        c.due(0, "slow")


def test_node_lost_only_after_a_permanent_kill_of_this_rank_fired(tmp_path):
    faults = parse("kill:rank=1,step=50,permanent; kill:rank=2,step=50")
    one, two = (Chaos(faults, rank=r, marker_dir=tmp_path) for r in (1, 2))
    assert not one.node_lost() and not two.node_lost()
    assert one.take(50, "kill") is not None and two.take(50, "kill") is not None
    assert not two.node_lost()  # an ordinary kill: the replacement comes back
    assert Chaos(faults, rank=1, marker_dir=tmp_path).node_lost()  # a restarted process sees the marker


def test_chaos_rejects_duplicate_ids():
    f = Fault(kind="kill", rank=1, step=2)
    with pytest.raises(InputError, match="duplicate"):
        Chaos([f, f], rank=0, marker_dir=None)


def test_down_is_served_once_by_the_replacement(tmp_path):
    from megacluster.train.chaos import Chaos, format, parse

    faults = parse("kill:rank=1,step=5,down=2.5")
    assert faults[0].down == 2.5 and parse(format(faults)) == faults
    first = Chaos(faults, rank=1, marker_dir=tmp_path)
    assert first.downtime() == 0.0  # not fired yet: nothing to serve
    first.fire(first.due(5, "kill"))
    replacement = Chaos(faults, rank=1, marker_dir=tmp_path)  # a new process after the kill
    assert replacement.downtime() == 2.5
    assert Chaos(faults, rank=1, marker_dir=tmp_path).downtime() == 0.0  # served once only
    assert Chaos(faults, rank=0, marker_dir=tmp_path).downtime() == 0.0
    with pytest.raises(InputError, match="down applies to a kill that is not permanent"):
        parse("kill:rank=1,step=5,permanent,down=3")


def test_flap_times_fires_that_many_times_across_restarts(tmp_path):
    faults = parse("flap:step=6,times=3")
    assert faults[0].times == 3 and chaos.format(faults) == "flap:step=6,times=3"
    first = Chaos(faults, rank=0, marker_dir=tmp_path)
    assert first.take(6, "flap") is not None and first.take(6, "flap") is not None
    again = Chaos(faults, rank=0, marker_dir=tmp_path)  # a restarted process: two firings are on disk
    assert again.take(6, "flap") is not None and again.take(6, "flap") is None and again.fired(faults[0])
    with pytest.raises(InputError, match="unknown key .times. for kill"):
        parse("kill:rank=0,step=3,times=2")
    with pytest.raises(InputError, match="times must be an integer >= 1"):
        parse("flap:step=3,times=0")


@pytest.mark.parametrize("spec, ok", [("kill:rank=0,step=0", False), ("hang:rank=1,step=11", False),
                                      ("flap:step=10", True), ("slow:rank=0,step=0,factor=2", True),
                                      ("slow:rank=0,step=11,factor=2", False), ("kill:rank=0,step=1", True)])
def test_a_fault_at_a_step_the_run_never_completes_is_refused(spec, ok):
    """Steps are 1 to max_steps: a one-shot fault at step 0 or any fault past the end would never fire."""
    from megacluster import config

    if ok:
        config.build("tiny", None, ["run.max_steps=10", f"run.chaos={spec}"])
    else:
        with pytest.raises(InputError, match=r"run.chaos.*never completes: steps are 1 to run.max_steps=10"):
            config.build("tiny", None, ["run.max_steps=10", f"run.chaos={spec}"])


def test_a_flap_in_a_run_of_one_worker_is_refused():
    """A flap breaks the links between workers: with one there is none, and the fault would never fire."""
    from megacluster.train.chaos import check_ranks

    with pytest.raises(InputError, match="fault 'flap-s2' breaks the links between workers, and the run has 1: a flap "
                                         "needs --workers 2 or more"):
        check_ranks(parse("flap:step=2"), 1)
    check_ranks(parse("flap:step=2; kill:rank=1,step=3"), 2)


def test_permanent_kills_of_every_rank_are_refused():
    """With no worker left the run ended in exit 1, pointing at worker errors that were never printed."""
    from megacluster.train.chaos import check_ranks

    with pytest.raises(InputError, match=r"permanent kills of rank\(s\) 0 leave none of the run's 1 worker"):
        check_ranks(parse("kill:rank=0,step=1,permanent"), 1)
    with pytest.raises(InputError, match=r"rank\(s\) 0, 1 leave none of the run's 2"):
        check_ranks(parse("kill:rank=0,step=1,permanent; kill:rank=1,step=3,permanent"), 2)
    check_ranks(parse("kill:rank=0,step=1,permanent"), 2)  # one survives


@pytest.mark.parametrize("spec, needle", [("flap:step=1,times=x", "times must be an integer >= 1, got 'x'"),
                                          ("kill:rank=\uff10,step=1", "rank must be an integer >= 0")])
def test_counts_are_ascii_integers_and_the_message_says_the_real_minimum(spec, needle):
    with pytest.raises(InputError, match=needle):
        parse(spec)
