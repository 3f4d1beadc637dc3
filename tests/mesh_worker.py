"""A short training run of the small test config on N virtual CPU devices (or as one process of a
multi-process run), for tests/test_sharding.py. JAX reads XLA_FLAGS once, so each mesh needs its
own process.

  python tests/mesh_worker.py --devices 8 --mesh '{"expert": 4, "data": 2}' --workdir DIR
      [--steps 5] [--stop-after K] [--sample] [--save-every 3]
      [--coordinator HOST:PORT --num-processes N --process-id I]

      [--lora-from CHECKPOINT] [--chat FILE.jsonl]

Prints one line "RESULT {json}" with the train losses by step (process 0).
"""

import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--devices", type=int, required=True)
ap.add_argument("--mesh", required=True)
ap.add_argument("--workdir", required=True)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--stop-after", type=int, default=None)
ap.add_argument("--sample", action="store_true")
ap.add_argument("--save-every", type=int, default=3)
ap.add_argument("--coordinator", default="")
ap.add_argument("--num-processes", type=int, default=-1)
ap.add_argument("--process-id", type=int, default=-1)
ap.add_argument("--lora-from", default="", help="train LoRA adapters (on every target) on this checkpoint")
ap.add_argument("--chat", default="", help="a chat JSONL file to train on (config.data.format='chat')")
args = ap.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
# XLA:CPU runs every virtual device's work on one shared thread pool (8 threads on this 2-core VM); devices that
# wait at a collective hold their threads, so under context parallelism (the last slice has the most causal
# attention work, the first ones run ahead) the pool must outnumber the waiters or the last devices starve
os.environ.setdefault("PJRT_NPROC", "32")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from test_training import small_config, train_losses  # noqa: E402

from tasks.jamba_lm import JambaLMTask  # noqa: E402
from training import distributed, train  # noqa: E402

config = small_config(num_train_steps=args.steps, save_every_steps=args.save_every, eval_every_steps=args.steps,
                      keep_checkpoints=3, batch_size=8,
                      sample_prompt="dog:" if args.sample else "", sample_tokens=8)
config.mesh.data = 1
if args.lora_from:
    config.init_from, config.lora.rank = args.lora_from, 4
    config.lora.targets = "q_proj,o_proj,in_proj,dt_proj,gate_proj,experts.gate_proj,experts.up_proj,experts.down_proj"
if args.chat:
    config.data.source, config.data.format = "jsonl", "chat"
    config.data.train_files = config.data.validation_files = args.chat
for axis, size in json.loads(args.mesh).items():
    config.mesh[axis] = size
config.distributed.coordinator_address = args.coordinator
config.distributed.num_processes = args.num_processes
config.distributed.process_id = args.process_id
distributed.initialize(config)
train.run(JambaLMTask(config), config, args.workdir, stop_after=args.stop_after)
if args.process_id <= 0:
    print("RESULT " + json.dumps({"losses": train_losses(args.workdir)}), flush=True)
