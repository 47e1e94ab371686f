"""One owner per worker: how a worker ended is recorded right, cancellations cannot keep a model
reloading, and no worker process or pipe outlives the service that started it."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import termios
from pathlib import Path

import grpc
import numpy as np
from inference.v1 import worker_pool_pb2 as admin_pb

from services.inference import codec, ipc
from tests.inference.conftest import eventually_async
from tests.inference.test_pool import echo_request, scrape


def sample(text: str, series: str) -> float:
    """The value of one exact series line (0 if absent: a counter never incremented)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def worker_fd(pid: int, option: str) -> int:
    """A worker's pipe descriptor, as the supervisor passed it on its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(option.encode()) + 1])


def bytes_waiting(pid: int) -> int:
    """Bytes written to a worker's input pipe that it has not read (FIONREAD on the pipe)."""
    fd = os.open(f"/proc/{pid}/fd/{worker_fd(pid, '--read-fd')}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        buffer = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", buffer)[0])
    finally:
        os.close(fd)


def pipe_inodes(pid: int) -> set[str]:
    """The pipes a worker talks over ("pipe:[inode]")."""
    links = {os.readlink(f"/proc/{pid}/fd/{worker_fd(pid, option)}") for option in ("--read-fd", "--write-fd")}
    assert all(link.startswith("pipe:") for link in links), links
    return links


def own_pipes() -> set[str]:
    links = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue  # closed meanwhile
    return links


def reaped(pid: int) -> bool:
    """Gone from the process table: exited and waited for (a zombie still has /proc/<pid>)."""
    return not Path(f"/proc/{pid}").exists()


async def test_a_worker_sigkilled_during_a_health_check_is_recorded_as_exited(start_inference):
    # A long ping timeout, frequent pings: once the worker is stopped, a ping waits unanswered in its pipe.
    inference = await start_inference(["echo"], health_interval_seconds=0.05, health_timeout_seconds=30)
    [before] = await inference.workers("echo")
    os.kill(before.pid, signal.SIGSTOP)
    try:
        await eventually_async(lambda: asyncio.to_thread(bytes_waiting, before.pid), within=10)
    finally:
        os.kill(before.pid, signal.SIGKILL)  # the pipe closes under the pending ping

    async def replaced():
        [now] = await inference.workers("echo")
        return now if now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY else None

    after = await eventually_async(replaced, within=30)
    assert after.last_error == "exited with code -9"
    assert after.restarts == 1
    text = await asyncio.to_thread(scrape, inference)
    assert sample(text, 'inference_worker_restarts_total{model="echo",reason="crashed"}') == 1
    assert sample(text, 'inference_worker_restarts_total{model="echo",reason="unresponsive"}') == 0


async def busy(inference, model: str) -> bool:
    [now] = await inference.workers(model)
    return now.state == admin_pb.WORKER_STATE_BUSY


async def ready(inference, model: str) -> admin_pb.WorkerHealth | None:
    [now] = await inference.workers(model)
    return now if now.state == admin_pb.WORKER_STATE_READY and now.in_flight == 0 else None


async def test_cancelled_requests_that_finish_within_the_grace_keep_their_worker(start_inference):
    inference = await start_inference(["sleepy"], abandon_grace_seconds=10)
    [before] = await inference.workers("sleepy")
    for _ in range(5):
        call = inference.stub.ModelInfer(echo_request(0.2, "sleepy"), timeout=20)
        await eventually_async(lambda: busy(inference, "sleepy"), within=10)
        call.cancel()
        await eventually_async(lambda: ready(inference, "sleepy"), within=10)
    [after] = await inference.workers("sleepy")
    assert after.pid == before.pid
    assert after.restarts == 0
    answer = await inference.stub.ModelInfer(echo_request(0.0, "sleepy"), timeout=10)
    assert codec.response_arrays(answer)["OUTPUT0"].tolist() == [[0.0]]
    text = await asyncio.to_thread(scrape, inference)
    assert sample(text, 'inference_abandoned_total{model="sleepy",outcome="finished"}') == 5
    assert sample(text, 'inference_abandoned_total{model="sleepy",outcome="killed"}') == 0


async def test_a_flood_of_cancelled_hung_requests_backs_off_and_others_are_served(start_inference, logs):
    inference = await start_inference(
        ["sleepy", "echo"], abandon_grace_seconds=0.05, restart_backoff_seconds=0.2, restart_backoff_max_seconds=5
    )
    for round_ in range(3):
        [before] = await inference.workers("sleepy")
        call = inference.stub.ModelInfer(echo_request(30.0, "sleepy"), timeout=60)
        await eventually_async(lambda: busy(inference, "sleepy"), within=30)
        call.cancel()
        # Meanwhile the other model serves as usual.
        answer = await inference.stub.ModelInfer(echo_request(float(round_)), timeout=10)
        assert codec.response_arrays(answer)["OUTPUT0"].tolist() == [[float(round_)]]

        async def replaced(old: int = before.pid) -> bool:
            now = await ready(inference, "sleepy")
            return now is not None and now.pid != old

        await eventually_async(replaced, within=30)
        assert reaped(before.pid)
    delays = [line["delay_seconds"] for line in logs.events("worker.restart_delayed")]
    assert delays == [0.2, 0.4, 0.8]
    [after] = await inference.workers("sleepy")
    assert after.restarts == 3
    assert "cancelled" in after.last_error
    text = await asyncio.to_thread(scrape, inference)
    assert sample(text, 'inference_worker_restarts_total{model="sleepy",reason="cancelled"}') == 3
    assert sample(text, 'inference_abandoned_total{model="sleepy",outcome="killed"}') == 3


async def test_a_deadline_past_while_running_kills_only_after_the_grace(start_inference):
    inference = await start_inference(["sleepy"], timeout_seconds=0.3, abandon_grace_seconds=10)
    [before] = await inference.workers("sleepy")
    error = await inference.stub.ModelInfer(echo_request(0.6, "sleepy"), timeout=10).code()
    assert error == grpc.StatusCode.DEADLINE_EXCEEDED
    after = await eventually_async(lambda: ready(inference, "sleepy"), within=10)
    assert after.pid == before.pid  # it finished within the grace: its answer was dropped, it serves on
    assert after.restarts == 0


async def test_no_worker_process_or_pipe_outlives_the_service(start_inference):
    """Every way a worker ends: replaced after a crash, failed start, start cancelled by the stop, pool stop."""
    inference = await start_inference(
        ["echo", "sleepy2", "failload", "slowload"], wait=False, restart_backoff_seconds=0.05
    )

    async def loaded() -> list[admin_pb.WorkerHealth] | None:
        workers = await inference.workers()
        return workers if sum(w.state == admin_pb.WORKER_STATE_READY for w in workers) == 3 else None

    def loading() -> list[int]:
        return [pid for pid, _ in children() if b"slowload" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    workers = await eventually_async(loaded, within=60)
    [slow] = await eventually_async(lambda: asyncio.to_thread(loading), within=30)
    pids = {w.pid for w in workers} | {slow}
    pipes = set().union(*(pipe_inodes(pid) for pid in pids))
    assert pipes <= own_pipes()  # the supervisor holds the other ends

    [crashed] = [w for w in workers if w.model_name == "echo"]
    os.kill(crashed.pid, signal.SIGKILL)

    async def replaced() -> admin_pb.WorkerHealth | None:
        [now] = await inference.workers("echo")
        return now if now.pid not in (0, crashed.pid) and now.state == admin_pb.WORKER_STATE_READY else None

    replacement = await eventually_async(replaced, within=30)
    assert await eventually_async(lambda: asyncio.to_thread(reaped, crashed.pid), within=10)
    pids.add(replacement.pid)
    pipes |= pipe_inodes(replacement.pid)
    assert await inference.stub.ModelInfer(echo_request(), timeout=10)

    await inference.channel.close()
    await inference.server.stop()

    assert [pid for pid in pids if not reaped(pid)] == []
    assert pipes & own_pipes() == set()
    # failload's workers failed their start over and over, slowload's start was cancelled: none is left,
    # not even as a zombie.
    assert children() == []


def children() -> list[tuple[int, str]]:
    """Processes whose parent is this process, in any state (a zombie included), with their state."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == os.getpid():
            found.append((int(name), state))
    return found


async def test_each_caller_gets_its_own_answer_from_a_busy_pool(start_inference):
    """A busy pool of two answers every request with its own data (no answer goes to another caller)."""
    inference = await start_inference(["sleepy2"])
    values = [float(i) / 100 for i in range(12)]
    answers = await asyncio.gather(
        *(inference.stub.ModelInfer(echo_request(value, "sleepy2"), timeout=20) for value in values)
    )
    got = [codec.response_arrays(answer)["OUTPUT0"].tolist() for answer in answers]
    assert got == [[[np.float32(value).item()]] for value in values]


async def test_shared_memory_is_reused_and_outlives_neither_its_worker_nor_a_cancelled_request(start_inference):
    """Each worker has two arenas (calls in, answers out), reused from one request to the next; a worker
    killed with them mapped and a request cancelled in flight leave nothing under the pool's prefix."""

    def one_worker(repository: Path) -> None:
        config = repository / "identity_fp32" / "config.yaml"
        config.write_text(config.read_text().replace("instances: {min: 1, max: 2}", "instances: {min: 1, max: 1}"))

    inference = await start_inference(["identity_fp32"], prepare=one_worker)
    prefix = f"mlp-{os.getpid()}-identity_fp32-"

    def files() -> list[str]:
        return sorted(name for name in os.listdir(ipc.SHM_DIR) if name.startswith(prefix))

    tensor = np.arange(512 * 4096, dtype=np.float32).reshape(512, 4096)  # 8 MiB
    request = codec.make_infer_request("identity_fp32", {"INPUT0": ("FP32", tensor)})
    for _ in range(3):
        answer = await inference.stub.ModelInfer(request, timeout=30)
        np.testing.assert_array_equal(codec.response_arrays(answer)["OUTPUT0"], tensor)
    arenas = files()
    assert len(arenas) == 2
    assert {name.rsplit("-", 2)[-2] for name in arenas} == {"in", "out"}

    for _ in range(5):  # cancelled at once, mid-way or not at all: whichever it was, nothing new stays
        call = inference.stub.ModelInfer(request, timeout=30)
        await asyncio.sleep(0)
        call.cancel()

    async def settled() -> bool:
        workers = await inference.workers("identity_fp32")
        return all(worker.state == admin_pb.WORKER_STATE_READY for worker in workers)

    await eventually_async(settled, within=30)
    assert len(files()) <= 2  # the arenas of the worker serving now, nothing more

    [worker] = await inference.workers("identity_fp32")
    os.kill(worker.pid, signal.SIGKILL)

    async def replaced() -> bool:
        [now] = await inference.workers("identity_fp32")
        return now.pid not in (0, worker.pid) and now.state == admin_pb.WORKER_STATE_READY

    await eventually_async(replaced, within=30)
    assert files() == []  # the dead worker's arenas went with it; the new one has none before its first call
    answer = await inference.stub.ModelInfer(request, timeout=30)
    np.testing.assert_array_equal(codec.response_arrays(answer)["OUTPUT0"], tensor)
    assert len(files()) == 2
