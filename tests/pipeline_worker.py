"""One process of a two-process pipeline run (started by test_pipeline.py): 2 processes x 2
CPU devices, pp=2 x tp=2, so each process holds one stage.

argv: process_id, coordinator port, transfer port, model dir, output json path.
"""

import json
import os
import sys

process_id, port, transfer_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model_dir, out = sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
# The CPU backend sends arrays between processes over sockets (jax.device_put across hosts).
jax.config.update("jax_cross_host_transfer_socket_address", f"127.0.0.1:{transfer_port + process_id}")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id, local_device_ids=[0, 1])

import jaxpar  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2
model = jaxpar.load(model_dir, policy={"axes": {"pp": 2, "tp": 2}, "layer_partition": "2,3"},
                    progress=False)
result = model.generate(["Once upon a time", "The little dog"], 8)
read = model.module.read
with open(out, "w") as f:
    json.dump({"token_ids": result.token_ids, "texts": result.texts, "processes": jax.process_count(),
               "held": [m is not None for m in model.module.stages],
               "tensors_read": sorted(set().union(*(r.tensors for r in read if r is not None))),
               "bytes_read": sum(r.bytes for r in read if r is not None)}, f)
jax.distributed.shutdown()
