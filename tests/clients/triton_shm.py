"""tritonclient's system shared-memory utilities end to end, run by the tests with .venv-clients' Python.

It reads a JSON list of commands on stdin, runs them in order on one tritonclient.grpc client, and
prints the list of answers on stdout. Regions are created and destroyed here with
``tritonclient.utils.shared_memory``, as a Triton user's program does:

    {"url": "127.0.0.1:50053", "action": "roundtrip", "model": "simple", "prefix": "t1234_"}

Actions:
    roundtrip   for "model" simple (two INT32 [rows, 16] inputs) or identity_fp32 (one FP32 [rows, cols]):
                clean up as Triton's examples do (unregister all system and CUDA regions), create an
                input and an output object under "prefix", register them, infer with every input and
                output in a region (the second of each at an offset), infer again with the last output
                raw, once more over ModelStreamInfer, unregister the input region, then all; destroy
                the objects. Reports statuses, whether each answer is right, the response's output
                parameters and raw entry sizes, and the CUDA answers.
    register    register_system_shared_memory(name, key, byte_size, offset) of an object that the
                test made itself (or none): the answer or the error
    status      get_system_shared_memory_status(as_json=True)
    unregister  unregister_system_shared_memory(name)
Errors come back as {"error": {"status": "...", "message": "..."}}.
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

STREAM_TIMEOUT_SECONDS = 60


def _error(error):
    return {"error": {"status": error.status(), "message": error.message()}}


def _tensors(model, rows, cols):
    if model == "simple":
        left = (np.arange(rows * 16, dtype=np.int32).reshape(rows, 16) * 7) - 50
        right = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16)[::-1].copy() * 3
        return {"INPUT0": left, "INPUT1": right}, {"OUTPUT0": left + right, "OUTPUT1": left - right}, "INT32"
    data = (np.arange(rows * cols, dtype=np.float32) % 1000).reshape(rows, cols) - 0.5
    return {"INPUT0": data}, {"OUTPUT0": data}, "FP32"


def _layout(arrays):
    """name -> (offset, size) of consecutive tensors, and the total."""
    offsets, at = {}, 0
    for name, array in arrays.items():
        offsets[name] = (at, array.nbytes)
        at += array.nbytes
    return offsets, at


def _request(inputs, outputs, datatype, in_offsets, out_offsets, raw_outputs=()):
    tensors = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        offset, size = in_offsets[name]
        tensor.set_shared_memory("in", size, offset)
        tensors.append(tensor)
    requested = []
    for name in outputs:
        output = grpcclient.InferRequestedOutput(name)
        if name not in raw_outputs:
            offset, size = out_offsets[name]
            output.set_shared_memory("out", size, offset)
        requested.append(output)
    return tensors, requested


def _parameters(parameters):
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in parameters.items()}


def _check(result, out_handle, expected, out_offsets, raw_outputs):
    correct = {}
    response = result.get_response()
    for tensor in response.outputs:
        want = expected[tensor.name]
        if tensor.name in raw_outputs:
            got = result.as_numpy(tensor.name)
        else:
            offset, _ = out_offsets[tensor.name]
            got = shm.get_contents_as_numpy(out_handle, want.dtype, list(tensor.shape), offset=offset)
        correct[tensor.name] = bool(list(tensor.shape) == list(want.shape) and np.array_equal(got, want))
    return {
        "correct": correct,
        "parameters": {tensor.name: _parameters(tensor.parameters) for tensor in response.outputs},
        "raw_lengths": [len(raw) for raw in response.raw_output_contents],
    }


def _stream(client, model, tensors, requested):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(model, tensors, outputs=requested, request_id="shm")
        return answers.get(timeout=STREAM_TIMEOUT_SECONDS)
    finally:
        client.stop_stream()


def _roundtrip(client, command):
    model, prefix = command["model"], command["prefix"]
    rows, cols = command.get("rows", 2), command.get("cols", 16)
    inputs, expected, datatype = _tensors(model, rows, cols)
    in_offsets, in_size = _layout(inputs)
    out_offsets, out_size = _layout(expected)
    answer = {}
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    answer["cuda_status"] = client.get_cuda_shared_memory_status(as_json=True)
    in_handle = shm.create_shared_memory_region("in", f"/{prefix}in", in_size)
    out_handle = shm.create_shared_memory_region("out", f"/{prefix}out", out_size)
    try:
        shm.set_shared_memory_region(in_handle, list(inputs.values()))
        client.register_system_shared_memory("in", f"/{prefix}in", in_size)
        client.register_system_shared_memory("out", f"/{prefix}out", out_size)
        answer["status"] = client.get_system_shared_memory_status(as_json=True)
        answer["status_in"] = client.get_system_shared_memory_status("in", as_json=True)

        tensors, requested = _request(inputs, expected, datatype, in_offsets, out_offsets)
        answer["all_in_regions"] = _check(
            client.infer(model, tensors, outputs=requested, client_timeout=30), out_handle, expected, out_offsets, ()
        )
        last = list(expected)[-1]
        tensors, requested = _request(inputs, expected, datatype, in_offsets, out_offsets, raw_outputs=(last,))
        answer["last_output_raw"] = _check(
            client.infer(model, tensors, outputs=requested, client_timeout=30),
            out_handle,
            expected,
            out_offsets,
            (last,),
        )
        tensors, requested = _request(inputs, expected, datatype, in_offsets, out_offsets)
        result, error = _stream(client, model, tensors, requested)
        answer["stream"] = _error(error) if error else _check(result, out_handle, expected, out_offsets, ())

        client.unregister_system_shared_memory("in")
        answer["status_after_one"] = client.get_system_shared_memory_status(as_json=True)
        client.unregister_system_shared_memory()
        answer["status_after_all"] = client.get_system_shared_memory_status(as_json=True)
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    answer["mapped_after"] = shm.mapped_shared_memory_regions()
    return answer


def run(client, command):
    action = command["action"]
    try:
        if action == "roundtrip":
            return _roundtrip(client, command)
        if action == "register":
            client.register_system_shared_memory(
                command["name"], command["key"], command["byte_size"], offset=command.get("offset", 0)
            )
            return {"registered": command["name"]}
        if action == "status":
            return client.get_system_shared_memory_status(command.get("name", ""), as_json=True)
        if action == "unregister":
            client.unregister_system_shared_memory(command.get("name", ""))
            return {"unregistered": command.get("name", "")}
    except InferenceServerException as error:
        return _error(error)
    raise SystemExit(f"unknown action {action}")


def main():
    commands = json.load(sys.stdin)
    client = grpcclient.InferenceServerClient(url=commands[0]["url"])
    try:
        answers = [run(client, one) for one in commands]
    finally:
        client.close()
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
