"""One process of a two-process engine (started by test_engine.py): prefill runs on
process 0's two devices (TP2), decode on process 1's (TPA1 + DCP2), under jax.distributed
(gloo) with JAX's cross-host transfer server carrying each request's cache.

argv: process_id, coordinator port, transfer port, model dir, requests json, output json.
"""

import json
import os
import sys

process_id, port, transfer_port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model_dir, requests_path, out = sys.argv[4], sys.argv[5], sys.argv[6]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_cross_host_transfer_socket_address", f"127.0.0.1:{transfer_port}")
jax.config.update("jax_cross_host_transport_addresses", "127.0.0.1:0")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id, local_device_ids=[0, 1])

import jaxpar  # noqa: E402

requests = json.loads(open(requests_path).read())
devices = jax.devices()
dcp2 = {"axes": {"tp": 2, "attn_tp": 1, "dcp": 2},
        "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]}
engine = jaxpar.Engine(model_dir, max_slots=2, max_len=64, prefill_chunk=16,
                       prefill_policy={"axes": {"tp": 2}}, prefill_devices=devices[:2],
                       decode_policy=dcp2, decode_devices=devices[2:])
result = engine.generate(requests["prompts"], requests["max_new_tokens"], ignore_eos=True)
with open(out, "w") as f:
    json.dump({"mode": engine.mode, "token_ids": result.token_ids, "texts": result.texts,
               "finish_reasons": result.finish_reasons, "ttft_ms": [r.ttft_ms for r in result],
               "processes": jax.process_count(),
               "local_devices": [d.id for d in jax.local_devices()]}, f)
jax.distributed.shutdown()
