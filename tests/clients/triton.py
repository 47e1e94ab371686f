"""A real tritonclient program, run by the tests with .venv-clients' Python.

It reads one JSON command (or a list of them, run in order on one client) on stdin and prints
one JSON result (or the list of results) on stdout:

    {"url": "127.0.0.1:50053", "action": "infer", "model": "iris",
     "inputs": [{"name": "input", "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}],
     "headers": {"authorization": "Bearer ..."}, "timeout": 5}

An input with ``"typed": true`` goes in the request's typed ``contents`` (as clients written for
Triton's protocol by hand may send it) instead of tritonclient's raw bytes; ``"parameters"`` of an
infer command become request parameters (``infer(parameters=...)``).

Actions:
    live, ready, metadata, infer
    config        get_model_config(model, version, as_json=True)
    statistics    get_inference_statistics(model, version, as_json=True) ("model" optional)
    stream        start_stream / async_stream_infer for each of "requests" (each like an infer
                  command: model, inputs, id) / stop_stream; the answers in the order they came
                  (a stream refused as a whole, e.g. without a token: its one error)
    large         one FP32 tensor of "mib" MiB, shape [rows, cols], made here (not sent as JSON),
                  through "model" (identity_fp32 or sum); checks the answer here and reports
                  {"shape", "bytes", "correct", "seconds"}
Errors come back as {"error": {"status": "...", "message": "..."}}.

The first command's "ssl" (optional) makes the client speak TLS (``ssl=True``):
``{"root_certificates": path, "private_key": path, "certificate_chain": path}`` (the last two for mutual TLS).
"""

import json
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

DTYPES = {
    "BOOL": np.bool_,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
STREAM_TIMEOUT_SECONDS = 60


def _inputs(specs):
    inputs = []
    for spec in specs:
        data = np.array(spec["data"], dtype=DTYPES[spec["datatype"]])
        if spec["datatype"] == "BYTES":
            data = np.array([item.encode() for item in data.flat], dtype=np.object_).reshape(data.shape)
        tensor = grpcclient.InferInput(spec["name"], list(data.shape), spec["datatype"])
        if spec.get("typed"):
            # tritonclient has no API for typed contents: fill its request tensor, leave its raw data unset.
            field = getattr(tensor._get_tensor().contents, CONTENTS_FIELDS[spec["datatype"]])
            field.extend(data.reshape(-1).tolist())
        else:
            tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def _jsonable(array):
    if array.dtype == np.object_:
        return [item.decode() if isinstance(item, bytes) else item for item in array.flat]
    return array.tolist()


def _result(result, outputs):
    return {
        name: {"data": _jsonable(result.as_numpy(name)), "shape": list(result.as_numpy(name).shape)} for name in outputs
    }


def _error(error):
    return {"error": {"status": error.status(), "message": error.message()}}


def _stream(client, command, headers):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    expected = 0
    try:
        for request in command["requests"]:
            try:
                client.async_stream_infer(
                    request["model"],
                    _inputs(request["inputs"]),
                    model_version=request.get("version", ""),
                    request_id=request.get("id", ""),
                )
            except InferenceServerException:
                expected = 1  # the stream ended: its one error reached the callback
                break
            expected += 1
        collected = []
        for _ in range(expected):
            result, error = answers.get(timeout=STREAM_TIMEOUT_SECONDS)
            if error is not None:
                collected.append(_error(error))
            else:
                response = result.get_response()
                collected.append({"id": response.id, "outputs": _result(result, [o.name for o in response.outputs])})
    finally:
        client.stop_stream()
    return {"answers": collected}


def _large(client, command, headers):
    mib = command["mib"]
    cols = command.get("cols", 4096)
    rows = mib * (1 << 20) // (4 * cols)
    data = (np.arange(rows * cols, dtype=np.float32) % 1000).reshape(rows, cols)
    tensor = grpcclient.InferInput("INPUT0", [rows, cols], "FP32")
    tensor.set_data_from_numpy(data)
    started = time.perf_counter()
    result = client.infer(command["model"], [tensor], headers=headers, client_timeout=command.get("timeout"))
    seconds = time.perf_counter() - started
    output = result.as_numpy("OUTPUT0")
    if command["model"] == "sum":
        correct = output.shape == (rows,) and bool(np.allclose(output, data.sum(axis=1, dtype=np.float32)))
    else:
        correct = output.shape == data.shape and bool(np.array_equal(output, data))
    return {"shape": list(output.shape), "bytes": data.nbytes, "correct": correct, "seconds": seconds}


def run(client, command):
    headers = command.get("headers")
    action = command["action"]
    try:
        if action == "live":
            return {"live": client.is_server_live(headers=headers)}
        if action == "ready":
            return {"ready": client.is_server_ready(headers=headers)}
        if action == "metadata":
            return client.get_model_metadata(command["model"], headers=headers, as_json=True)
        if action == "config":
            return client.get_model_config(command["model"], command.get("version", ""), headers=headers, as_json=True)
        if action == "statistics":
            return client.get_inference_statistics(
                command.get("model", ""), command.get("version", ""), headers=headers, as_json=True
            )
        if action == "infer":
            result = client.infer(
                command["model"],
                _inputs(command["inputs"]),
                model_version=command.get("version", ""),
                headers=headers,
                client_timeout=command.get("timeout"),
                parameters=command.get("parameters"),
            )
            return {
                "outputs": _result(result, command["outputs"]),
                "model_version": result.get_response().model_version,
            }
        if action == "stream":
            return _stream(client, command, headers)
        if action == "large":
            return _large(client, command, headers)
    except InferenceServerException as error:
        return _error(error)
    raise SystemExit(f"unknown action {action}")


def main():
    command = json.load(sys.stdin)
    commands = command if isinstance(command, list) else [command]
    ssl = commands[0].get("ssl")
    tls = {"ssl": True, **ssl} if ssl else {}
    client = grpcclient.InferenceServerClient(url=commands[0]["url"], **tls)
    try:
        answers = [run(client, one) for one in commands]
    finally:
        client.close()
    json.dump(answers if isinstance(command, list) else answers[0], sys.stdout)


if __name__ == "__main__":
    main()
