"""`jaxpar train MODEL --data TEXT --out DIR` (wired into jaxpar.cli)."""

from __future__ import annotations

import json
import sys

from jaxpar.training.step import REMAT_KINDS


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on a text file (sharded by a rule table, optax AdamW, "
                                     "Orbax checkpoints; resumes from --out)")
    p.add_argument("model", help="HF model folder, Llama .gguf file, Orbax checkpoint or alias")
    p.add_argument("--data", required=True, help="a UTF-8 text file; documents separated by blank lines")
    p.add_argument("--out", required=True,
                   help="folder for checkpoints/ and metrics.jsonl; if it holds checkpoints of the same "
                        "run, training resumes from the latest")
    p.add_argument("--steps", type=int, required=True, help="train until the state has taken this many steps")
    p.add_argument("--policy", default=None,
                   help="rule table: a preset (tp, tpa-dcp, dp-attention, sp, ep, gdn-replicated) or a "
                        "YAML file; default: one device")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="steps the learning-rate schedule spans (default --steps); set it to train in "
                        "several invocations with growing --steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip; 0 = none (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--remat", action="append", default=[], choices=list(REMAT_KINDS),
                   help="recompute this block kind in the backward pass (repeatable)")
    p.add_argument("--zero1", action="store_true",
                   help="also shard the optimizer state over the dp axis (ZeRO stage 1)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    p.add_argument("--save-every", type=int, default=None, help="save a checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from jaxpar.training.loop import summary, train
    from jaxpar.training.optimizer import OptimizerConfig

    optimizer = OptimizerConfig(learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.schedule_steps or args.steps,
                                schedule=args.schedule, weight_decay=args.weight_decay,
                                clip_norm=args.clip or None)
    result = train(args.model, args.data, args.out, steps=args.steps, policy=args.policy, batch=args.batch,
                   seq=args.seq, optimizer=optimizer, dtype=args.dtype, remat=args.remat, zero1=args.zero1,
                   seed=args.seed, save_every=args.save_every, max_to_keep=args.keep,
                   progress=sys.stderr.isatty())
    print(json.dumps(summary(result)))
    return 0
