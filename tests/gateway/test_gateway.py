"""The gateway in front of real auth and inference services: authentication, forwarding, health, streams."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from auth.v1 import auth_pb2 as auth_pb
from gateway.v1 import gateway_pb2 as pb
from grpc_health.v1 import health_pb2
from inference import grpc_service_pb2 as infer_pb
from sklearn.datasets import load_iris

from services.inference import codec
from tests.auth.conftest import PASSWORD
from tests.gateway.conftest import CACHE_SECONDS, bearer
from tests.inference.conftest import eventually_async, triton
from tests.inference.test_pool import is_worker_process
from tests.rpc import details, rpc_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def iris_request():
    return codec.make_infer_request("iris", {"input": ("FP32", np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))})


def sleepy_request(seconds: float):
    return codec.make_infer_request("sleepy", {"INPUT0": ("FP32", np.full((1, 1), seconds, dtype=np.float32))})


@pytest.fixture
async def platform(start_platform):
    return await start_platform()


async def test_register_login_and_infer_with_tritonclient(platform):
    token = await platform.user_token("tina")
    iris = load_iris()
    command = {
        "url": platform.address,
        "action": "infer",
        "model": "iris",
        "inputs": [{"name": "input", "datatype": "FP32", "data": iris.data[:20].astype("float32").tolist()}],
        "outputs": ["label"],
        "headers": {"authorization": f"Bearer {token}"},
    }
    answer = await asyncio.to_thread(triton, command)
    assert answer["outputs"]["label"]["data"] == iris.target[:20].tolist()
    refused = await asyncio.to_thread(triton, {**command, "headers": {}})
    assert refused["error"]["status"] == "StatusCode.UNAUTHENTICATED"
    live = await asyncio.to_thread(triton, {"url": platform.address, "action": "live"})
    assert live == {"live": True}  # ServerLive stays open


async def test_forged_and_missing_tokens_are_unauthenticated(platform):
    token = await platform.user_token("uri")
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    for metadata in ((), bearer(forged), bearer("garbage"), (("authorization", f"Basic {token}"),)):
        error = await rpc_error(platform.infer.ModelInfer(iris_request(), timeout=10, metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata


async def test_logout_refuses_the_token_within_the_cache_bound(platform):
    token = await platform.user_token("vera")
    assert (await platform.infer.ModelInfer(iris_request(), timeout=10, metadata=bearer(token))).outputs
    await platform.accounts.Logout(auth_pb.LogoutRequest(), metadata=bearer(token), timeout=10)
    logged_out = time.monotonic()

    async def refused():
        try:
            await platform.infer.ModelInfer(iris_request(), timeout=10, metadata=bearer(token))
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    await eventually_async(refused, within=10)
    assert time.monotonic() - logged_out <= CACHE_SECONDS + 0.5


async def test_password_change_refuses_other_sessions(platform):
    token = await platform.user_token("walt")
    other = (
        await platform.accounts.Login(auth_pb.LoginRequest(username="walt", password=PASSWORD), timeout=10)
    ).access_token
    await platform.accounts.ChangePassword(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="another fine passphrase"),
        metadata=bearer(token),
        timeout=10,
    )

    async def refused():
        try:
            await platform.infer.ModelInfer(iris_request(), timeout=10, metadata=bearer(other))
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    await eventually_async(refused, within=CACHE_SECONDS + 5)


async def test_admin_calls_need_the_admin_role(platform):
    token = await platform.user_token("xena")
    denied = await rpc_error(platform.ops.GetMLHealth(pb.GetMLHealthRequest(), metadata=bearer(token), timeout=10))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    validate = await rpc_error(
        platform.accounts.ValidateToken(
            auth_pb.ValidateTokenRequest(access_token=token), metadata=bearer(token), timeout=10
        )
    )
    assert validate.code() == grpc.StatusCode.PERMISSION_DENIED
    unload = await rpc_error(
        platform.infer.RepositoryModelUnload(
            infer_pb.RepositoryModelUnloadRequest(model_name="iris"), metadata=bearer(token), timeout=10
        )
    )
    assert unload.code() == grpc.StatusCode.PERMISSION_DENIED
    anonymous = await rpc_error(platform.ops.GetMLHealth(pb.GetMLHealthRequest(), timeout=10))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_ml_health_for_an_admin_shows_real_workers(platform):
    health = await platform.ops.GetMLHealth(
        pb.GetMLHealthRequest(), metadata=bearer(await platform.admin_token()), timeout=10
    )
    assert health.healthy
    assert {(m.model_name, m.ready_workers, m.total_workers) for m in health.models} == {
        ("iris", 1, 1),
        ("sleepy", 1, 1),
    }
    for worker in health.workers:
        assert is_worker_process(worker.pid)
        assert worker.uptime_seconds > 0


def http_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/internal/ml/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_http_ml_health(platform):
    status, document = await asyncio.to_thread(http_health, platform.gateway.metrics_port)
    assert status == 200
    assert document["healthy"] is True
    assert {w["model_name"] for w in document["workers"]} == {"iris", "sleepy"}
    assert all(w["state"] == "ready" and w["pid"] > 0 for w in document["workers"])

    await platform.inference.stop()

    async def unhealthy():
        return (await asyncio.to_thread(http_health, platform.gateway.metrics_port))[0] == 503

    await eventually_async(unhealthy, within=10)
    status, document = await asyncio.to_thread(http_health, platform.gateway.metrics_port)
    assert document["healthy"] is False
    assert document["error"]


async def test_stream_infer_answers_in_order_despite_a_bad_message(platform):
    token = await platform.user_token("yves")

    async def requests():
        for index in range(100):
            if index == 50:
                yield pb.StreamInferRequest(request=infer_pb.ModelInferRequest(model_name="iris"))  # no inputs
            else:
                request = iris_request()
                request.id = str(index)
                yield pb.StreamInferRequest(request=request)

    answers = [answer async for answer in platform.ops.StreamInfer(requests(), metadata=bearer(token), timeout=60)]
    assert [answer.sequence for answer in answers] == list(range(100))
    assert answers[50].WhichOneof("result") == "error"
    assert answers[50].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for index, answer in enumerate(answers):
        if index != 50:
            assert answer.response.id == str(index)
            assert codec.response_arrays(answer.response)["label"].tolist() == [0]


async def test_short_client_deadline_is_honoured_end_to_end(platform):
    token = await platform.user_token("zack")
    started = time.monotonic()
    error = await rpc_error(platform.infer.ModelInfer(sleepy_request(5.0), timeout=0.2, metadata=bearer(token)))
    elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.2 + 0.3


async def test_inference_down_is_unavailable_then_recovers(start_platform):
    platform = await start_platform()
    token = await platform.user_token("olga")
    port = platform.inference.port
    await platform.inference.stop()
    started = time.monotonic()
    error = await rpc_error(platform.infer.ModelInfer(iris_request(), timeout=2, metadata=bearer(token)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "inference" in error.details()
    assert time.monotonic() - started < 2

    async def not_ready():
        return await platform.health("readiness") == NOT_SERVING

    await eventually_async(not_ready, within=10)
    assert await platform.health("liveness") == SERVING

    from services.inference.app import build_server as build_inference
    from tests.inference.conftest import fast_settings

    revived = await build_inference(fast_settings(platform.repository, port=port))
    await revived.start()
    try:
        await platform.wait_ready(within=60)
        assert (await platform.infer.ModelInfer(iris_request(), timeout=10, metadata=bearer(token))).outputs
    finally:
        await revived.stop()


async def test_login_rate_limit_applies_to_the_real_client_ip(start_platform):
    platform = await start_platform(auth={"login_rate_per_ip": "3/minute"})
    for spoofed in ("10.1.1.1", "10.2.2.2", "10.3.3.3"):
        await rpc_error(
            platform.accounts.Login(
                auth_pb.LoginRequest(username="nobody-here", password="wrong password here"),
                metadata=(("x-forwarded-for", spoofed),),
                timeout=10,
            )
        )
    limited = await rpc_error(
        platform.accounts.Login(
            auth_pb.LoginRequest(username="nobody-else", password="wrong password here"),
            metadata=(("x-forwarded-for", "10.4.4.4"),),
            timeout=10,
        )
    )
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RetryInfo" in details(limited)
