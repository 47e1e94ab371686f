"""Container health check with the standard gRPC health protocol (grpc.health.v1.Health/Check).

    python /opt/ml-platform/healthcheck.py HOST:PORT [SERVICE ...] [--timeout SECONDS]

Exit 0 when every named health service (default: the server's overall health, "") is SERVING;
exit 1 otherwise (NOT_SERVING, an unknown name, no answer in time, nothing listening), with one
line on stderr saying why. The names the servers know: "" and "liveness" (alive, not shutting
down), "readiness" (able to do its job now) and each service's full name. compose.yaml uses this
where Kubernetes uses its native gRPC probes (livenessProbe/readinessProbe .grpc.service).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="gRPC health check for container healthchecks.")
    parser.add_argument("target", help="HOST:PORT of the gRPC server")
    parser.add_argument("services", nargs="*", default=[""], help='health service names (default: "")')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per check (default 2)")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in args.services:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=args.timeout)
            except grpc.RpcError as error:
                sys.stderr.write(f"{args.target} {service!r}: {error.code().name} {error.details() or ''}\n")
                return 1
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                sys.stderr.write(f"{args.target} {service!r}: {status}\n")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
