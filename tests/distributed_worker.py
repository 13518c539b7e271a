"""One process of a two-process jax.distributed run (started by test_distributed.py).

argv: process_id, coordinator port, model dir, output json path.
"""

import json
import os
import sys

process_id, port, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id, local_device_ids=[0, 1])

import jaxpar  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2
model = jaxpar.load(model_dir, policy={"axes": {"tp": 4}}, progress=False)
result = model.generate(["Once upon a time", "The little dog"], 24)
with open(out, "w") as f:
    json.dump({"token_ids": result.token_ids, "texts": result.texts,
               "mesh": dict(model.mesh.shape), "processes": jax.process_count()}, f)
jax.distributed.shutdown()
