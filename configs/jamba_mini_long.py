"""Long-context fine-tuning of Jamba-1.5-Mini: rows of 262,144 tokens (the released context length), each row
split over 8 devices (context parallelism: `jamba_jax.sequence_ops`, `common.attention.context`), experts over
8, on a 64-device slice; every weight trained (float32 master weights, bfloat16 compute, full remat).

  python main.py --config=jamba_mini_long --config.init_from=/path/to/AI21-Jamba-1.5-Mini \\
      --config.data.train_files='long/*.txt' --config.data.validation_files=long_validation.txt

The README's long-context table gives the dry run's bytes per device for this and smaller meshes
(`--config.dry_run=True --config.dry_run_devices=N --config.mesh.context=C`).
"""

from configs import jamba_mini_sft


def get_config():
    config = jamba_mini_sft.get_config()
    config.num_train_steps = 500  # optimizer steps (about 1B tokens)
    config.batch_size = 8  # rows per step: one per context group (2M tokens)
    config.seq_len = 262_144  # tokens per row
    config.learning_rate = 1e-5  # fine-tuning: a small peak rate
    config.warmup_steps = 20  # linear warmup
    config.save_every_steps = 50  # checkpoint cadence
    config.eval_every_steps = 50  # eval cadence
    config.eval_batches = 2  # validation rows per eval, times batch_size
    config.data.source = "text"  # long documents (books, code, papers), packed into rows
    config.data.format = "text"  # next-token loss on every token
    config.data.train_files = ""  # required: the training text files (a glob)
    config.data.validation_files = ""  # required: the validation text
    config.mesh.data = 1  # 64 devices: rows over the 8 expert groups, each row over 8 context slices
    config.mesh.fsdp = 1
    config.mesh.context = 8
    config.mesh.expert = 8
    return config
