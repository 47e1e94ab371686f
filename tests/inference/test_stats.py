"""InferenceStatistics: what one request adds, successes and failures, batches, forgetting a model."""

from __future__ import annotations

import time

import pytest

from services.inference.stats import Duration, InferenceStatistics, RequestTimer


def test_a_new_version_has_zero_statistics():
    stats = InferenceStatistics().get("m", "1")
    assert (stats.name, stats.version, stats.inference_count, stats.execution_count) == ("m", "1", 0, 0)
    assert stats.success == stats.fail == stats.queue == Duration()
    assert stats.last_inference_ms == 0


def test_a_successful_request_adds_its_phases():
    statistics = InferenceStatistics()
    before_ms = time.time_ns() // 1_000_000
    with statistics.request("m", "1") as timer:
        with timer.measure("compute_input"):
            time.sleep(0.001)
        timer.add("queue", 5)
        timer.add("compute_infer", 7)
        timer.add("compute_infer", 3)
        timer.add("compute_output", -4)  # clock noise never subtracts
        timer.succeeded(batch_size=4)
    stats = statistics.get("m", "1")
    assert (stats.inference_count, stats.execution_count) == (4, 1)
    assert stats.queue == Duration(1, 5)
    assert stats.compute_infer == Duration(1, 10)
    assert stats.compute_output == Duration(1, 0)
    assert stats.compute_input.count == 1
    assert stats.compute_input.ns >= 1_000_000
    assert stats.success.count == 1
    assert stats.success.ns >= stats.compute_input.ns + 15
    assert stats.fail == Duration()
    assert before_ms <= stats.last_inference_ms <= time.time_ns() // 1_000_000


def test_leaving_without_success_is_a_failure_and_counts_no_inference():
    statistics = InferenceStatistics()

    def fail() -> None:
        with statistics.request("m", "2") as timer:
            timer.add("queue", 100)
            raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        fail()
    with statistics.request("m", "2"):
        pass  # never marked successful
    stats = statistics.get("m", "2")
    assert stats.fail.count == 2
    assert (stats.inference_count, stats.execution_count, stats.success.count, stats.queue.count) == (0, 0, 0, 0)
    assert stats.last_inference_ms > 0


def test_versions_are_separate_and_forget_drops_a_model():
    statistics = InferenceStatistics()
    for name, version in (("a", "1"), ("a", "2"), ("b", "1")):
        timer = RequestTimer()
        timer.succeeded()
        statistics.record(name, version, timer)
    statistics.record("a", "1", RequestTimer())
    assert statistics.get("a", "1").execution_count == 1
    assert statistics.get("a", "1").fail.count == 1
    assert statistics.get("a", "2").fail.count == 0
    statistics.forget("a")
    assert statistics.get("a", "1").execution_count == 0
    assert statistics.get("b", "1").execution_count == 1


def test_a_batch_of_zero_counts_one_inference():
    timer = RequestTimer()
    timer.succeeded(0)
    assert timer.batch_size == 1
