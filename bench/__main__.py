"""``python -m bench`` (``make bench``): run every benchmark and print Markdown tables."""

import asyncio

from bench import (
    auth_login,
    auth_reset,
    auth_stores,
    chassis_overhead,
    gateway_hop,
    inference_iris,
    ipc_throughput,
    large_tensors,
    model_lifecycle,
    tls,
    vs_mlserver,
)

if __name__ == "__main__":
    asyncio.run(chassis_overhead.main())
    asyncio.run(auth_login.main())
    asyncio.run(auth_reset.main())
    asyncio.run(auth_stores.main())
    asyncio.run(ipc_throughput.main())
    asyncio.run(vs_mlserver.main())
    asyncio.run(inference_iris.main())
    asyncio.run(gateway_hop.main())
    asyncio.run(tls.main())
    asyncio.run(large_tensors.main())
    asyncio.run(model_lifecycle.main())
