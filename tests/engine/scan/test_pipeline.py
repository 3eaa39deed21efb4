"""engine.scan.pipeline: pass 2's producer/consumer driver (its numbers are checked in test_math), and
the settings table it reads."""

from __future__ import annotations

import threading

import pytest
import torch

from engine import settings
from engine.scan.pipeline import PRODUCER_NAME, pipeline_threads, producer_count, run_two_stage


def _producer_alive() -> bool:
    return any(t.name.startswith(PRODUCER_NAME) and t.is_alive() for t in threading.enumerate())


def test_runs_ahead_in_a_second_thread_in_order():
    before = torch.get_num_threads()
    log: list[tuple[str, int, str, int]] = []

    def produce(i: int) -> int:
        log.append(("p", i, threading.current_thread().name, torch.get_num_threads()))
        return i * i

    def consume(i: int, v: int) -> None:
        assert v == i * i
        log.append(("c", i, threading.current_thread().name, torch.get_num_threads()))

    run_two_stage(range(6), produce, consume, (1, 1))
    assert [i for k, i, *_ in log if k == "c"] == list(range(6))
    assert {(name, n) for k, _, name, n in log if k == "p"} == {("explaind-pipeline-producer", 1)}
    assert {(name, n) for k, _, name, n in log if k == "c"} == {(threading.current_thread().name, 1)}
    assert torch.get_num_threads() == before  # the caller's thread count is restored
    assert not _producer_alive()


def test_without_threads_everything_runs_here():
    names = []
    run_two_stage(range(3), lambda i: names.append(threading.current_thread().name) or i, lambda i, v: None, None)
    assert names == [threading.current_thread().name] * 3


def test_a_producer_error_reaches_the_caller():
    consumed = []

    def produce(i: int) -> int:
        if i == 3:
            raise ValueError("bad update 3")
        return i

    with pytest.raises(ValueError, match="bad update 3"):
        run_two_stage(range(10), produce, lambda i, v: consumed.append(i), (1, 1))
    assert consumed == [0, 1, 2]
    assert not _producer_alive()


def test_a_consumer_error_stops_the_producer():
    produced = []

    def consume(i: int, v: int) -> None:
        if i == 2:
            raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        run_two_stage(range(1000), lambda i: produced.append(i) or i, consume, (1, 1), ahead=1)
    assert not _producer_alive()
    assert len(produced) <= 4  # stopped right away, not run to the end


def test_producers_and_a_helping_caller_deliver_in_order():
    """Three producer threads (each its own function, as each has its own model) and the calling thread, which
    takes items itself while the producers are busy: every item is consumed once and in order, with the values of
    the one-thread run, and every item's production ran with the same torch thread count (the producer side's
    six split three ways) whichever thread took it."""
    import time

    log: dict[int, tuple[str, int]] = {}
    got: list[tuple[int, float]] = []

    def produce(i: int) -> float:
        log[i] = (threading.current_thread().name, torch.get_num_threads())
        if threading.current_thread().name.startswith(PRODUCER_NAME):
            time.sleep(0.01)  # slow producers: the caller has time to help
        return i * 0.5

    def consume(i: int, v: float) -> None:
        got.append((i, v))
        assert torch.get_num_threads() == 1  # the consumer's own count is back after helping

    ref: list[tuple[int, float]] = []
    run_two_stage(range(40), [produce] * 3, lambda i, v: ref.append((i, v)), None)
    assert ref == [(i, i * 0.5) for i in range(40)]
    log.clear()
    before = torch.get_num_threads()
    run_two_stage(range(40), [produce] * 3, consume, (6, 1), helper=produce)
    assert torch.get_num_threads() == before
    assert got == ref
    names = {name for name, _ in log.values()}
    assert threading.current_thread().name in names, names  # the caller helped
    assert {f"{PRODUCER_NAME}-1", f"{PRODUCER_NAME}-2"} <= names, names  # and the producers took turns
    assert {n for _, n in log.values()} == {2}
    assert not _producer_alive()


@pytest.mark.parametrize("bad", [0, 1, 4])
@pytest.mark.parametrize("helps", [False, True])
def test_an_error_in_any_producer_reaches_the_caller(bad, helps):
    """Whichever of three producers (or the helping caller) fails, its error is raised here after the items before
    it were consumed, and every producer thread has stopped."""
    consumed = []

    def produce(i: int) -> int:
        if i == bad:
            raise ValueError(f"bad update {i}")
        return i

    with pytest.raises(ValueError, match=f"bad update {bad}"):
        run_two_stage(range(30), [produce] * 3, lambda i, v: consumed.append(i), (1, 1),
                      helper=produce if helps else None)
    assert consumed == list(range(bad))
    assert not _producer_alive()


def test_several_producers_stay_within_ahead_each():
    import time

    done = [0]
    lead: list[int] = []

    def produce(i: int) -> int:
        lead.append(i - done[0])
        return i

    def consume(i: int, v: int) -> None:
        time.sleep(0.002)
        done[0] += 1

    run_two_stage(range(40), [produce, produce], consume, (1, 1), ahead=1)
    assert max(lead) == 3  # two producers, each up to two items: memory stays bounded


def test_pipeline_threads(monkeypatch):
    monkeypatch.delenv("EXPLAIND_PIPELINE", raising=False)
    assert pipeline_threads("cpu", 1) is None
    assert pipeline_threads("cpu", 2) == (1, 1)
    assert pipeline_threads("cpu", 5) == (3, 2)
    assert pipeline_threads("cuda", 4) is None
    monkeypatch.setenv("EXPLAIND_PIPELINE", "0")
    assert pipeline_threads("cpu", 4) is None
    with settings.override(pipeline=True):  # an override beats the environment
        assert pipeline_threads("cpu", 4) == (2, 2)
    assert pipeline_threads("cpu", 4) is None
    monkeypatch.delenv("EXPLAIND_PIPELINE_PRODUCERS", raising=False)
    assert producer_count(None) == 1 and producer_count((1, 1)) == 1
    with settings.override(pipeline_producers=3):
        assert producer_count((1, 1)) == 3 and producer_count(None) == 1


@pytest.mark.parametrize("ahead", [1, 2])
def test_produces_at_most_ahead_items_in_advance(ahead):
    import time

    done = [0]  # items fully consumed
    lead = []

    def produce(i: int) -> int:
        lead.append(i - done[0])
        return i

    def consume(i: int, v: int) -> None:
        time.sleep(0.002)  # a slow consumer: the producer has to wait for it
        done[0] += 1

    run_two_stage(range(30), produce, consume, (1, 1), ahead=ahead)
    assert max(lead) == ahead  # it did run ahead, and never further (bounded memory)


def test_env_settings_explain_bad_values(monkeypatch):
    from engine.settings import env_flag, env_int

    monkeypatch.setenv("EXPLAIND_THREADS_PER_GROUP", "two")
    with pytest.raises(ValueError, match=r"EXPLAIND_THREADS_PER_GROUP='two': set it to an integer >= 1 \(torch threads"):
        settings.get("threads_per_group")
    monkeypatch.setenv("EXPLAIND_THREADS_PER_GROUP", "3")
    assert settings.get("threads_per_group") == 3
    monkeypatch.setenv("EXPLAIND_X", "-1")
    with pytest.raises(ValueError, match="or unset it for the default 5"):
        env_int("EXPLAIND_X", 5, "something", minimum=0)
    monkeypatch.setenv("EXPLAIND_X", "")
    assert env_int("EXPLAIND_X", 5, "something") == 5
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv("EXPLAIND_X", off)
        assert env_flag("EXPLAIND_X") is False
    monkeypatch.setenv("EXPLAIND_X", "1")
    assert env_flag("EXPLAIND_X") is True
    monkeypatch.delenv("EXPLAIND_X")
    assert env_flag("EXPLAIND_X", default=False) is False


def test_settings_table_override_and_snapshot(monkeypatch):
    """One table, read when used: an override beats the environment, nests, checks its values and names, and a
    snapshot holds the job-scope settings a job carries to its workers (not the per-process ones)."""
    monkeypatch.setenv("EXPLAIND_KEEP_U_BYTES", "1000")
    assert settings.get("keep_u_bytes") == 1000  # read at use, not at import
    with settings.override(keep_u_bytes=5, pipeline=False):
        assert settings.get("keep_u_bytes") == 5 and settings.get("pipeline") is False
        with settings.override(keep_u_bytes=7):
            assert settings.get("keep_u_bytes") == 7
        snap = settings.snapshot()
        assert snap["keep_u_bytes"] == 5 and snap["pipeline"] is False
        assert "worker_threads" not in snap and "mallopt" not in snap  # each process reads its own
    assert settings.get("keep_u_bytes") == 1000
    with settings.applied(snap):
        assert settings.get("keep_u_bytes") == 5
    with pytest.raises(KeyError, match="no engine setting 'keep_bytes'; the settings are light_bytes"):
        settings.get("keep_bytes")
    with pytest.raises(ValueError, match=r"threads_per_group=0: set it to an integer >= 1 \(torch threads"):
        with settings.override(threads_per_group=0):
            pass
    names = [r["env"] for r in settings.rows()]
    assert len(names) == len(set(names)) and all(n.startswith("EXPLAIND_") for n in names)
