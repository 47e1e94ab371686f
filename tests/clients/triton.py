"""A real tritonclient program, run by the tests with .venv-clients' Python.

It reads one JSON command on stdin and prints one JSON result on stdout:

    {"url": "127.0.0.1:50053", "action": "infer", "model": "iris",
     "inputs": [{"name": "input", "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}],
     "headers": {"authorization": "Bearer ..."}, "timeout": 5}

Actions: live, ready, metadata, infer.
Errors come back as {"error": {"status": "...", "message": "..."}}.
"""

import json
import sys

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


def _inputs(specs):
    inputs = []
    for spec in specs:
        data = np.array(spec["data"], dtype=DTYPES[spec["datatype"]])
        if spec["datatype"] == "BYTES":
            data = np.array([item.encode() for item in data.flat], dtype=np.object_).reshape(data.shape)
        tensor = grpcclient.InferInput(spec["name"], list(data.shape), spec["datatype"])
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


def main():
    command = json.load(sys.stdin)
    client = grpcclient.InferenceServerClient(url=command["url"])
    headers = command.get("headers")
    action = command["action"]
    try:
        if action == "live":
            answer = {"live": client.is_server_live(headers=headers)}
        elif action == "ready":
            answer = {"ready": client.is_server_ready(headers=headers)}
        elif action == "metadata":
            answer = client.get_model_metadata(command["model"], headers=headers, as_json=True)
        elif action == "infer":
            result = client.infer(
                command["model"],
                _inputs(command["inputs"]),
                model_version=command.get("version", ""),
                headers=headers,
                client_timeout=command.get("timeout"),
            )
            answer = {
                "outputs": _result(result, command["outputs"]),
                "model_version": result.get_response().model_version,
            }
        else:
            raise SystemExit(f"unknown action {action}")
    except InferenceServerException as error:
        answer = {"error": {"status": error.status(), "message": error.message()}}
    finally:
        client.close()
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
