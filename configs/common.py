"""Fields shared by every training config; each job's get_config() starts from these."""

import ml_collections


def training_config():
    c = ml_collections.ConfigDict()
    c.task = "jamba_lm"  # main.py runs tasks/<task>.py (its Task on the shared loop, or its run())
    c.seed = 0  # PRNG seed: init, data order
    c.dry_run = False  # only build the abstract state and report parameter / memory sizes
    c.dry_run_devices = 0  # dry run: size the mesh for this many devices (0 = the devices present)

    c.num_train_steps = 1000  # optimizer steps
    c.batch_size = 8  # sequences per optimizer step (global, all processes)
    c.seq_len = 512  # tokens per packed row
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)

    c.learning_rate = 3e-4  # peak learning rate
    c.warmup_steps = 100  # linear warmup from 0
    c.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
    c.weight_decay = 0.1  # AdamW decoupled decay (not on norms, biases, A_log, D)
    c.adam_b1 = 0.9  # AdamW beta1
    c.adam_b2 = 0.95  # AdamW beta2
    c.adam_eps = 1e-8  # AdamW epsilon
    c.grad_clip_norm = 1.0  # global-norm clipping
    c.activation_loss_coef = 0.0  # Jamba-1.5 activation loss weight (0 = off)

    c.log_every_steps = 10  # metrics.jsonl / TensorBoard cadence
    c.eval_every_steps = 200  # eval loss and perplexity cadence
    c.eval_batches = 16  # batches of the validation split per eval
    c.eval_at_start = False  # also evaluate the starting parameters (a step-0 row in metrics.jsonl)
    c.save_every_steps = 200  # checkpoint cadence (and always at the end)
    c.keep_checkpoints = 3  # checkpoints kept in workdir/checkpoints
    c.sample_prompt = ""  # greedy sample printed at the end ("" = none)
    c.sample_tokens = 32  # tokens in that sample

    c.data = ml_collections.ConfigDict()
    c.data.source = "bundled"  # bundled | text | jsonl | tfds
    c.data.train_files = ""  # text/jsonl: file or glob (or a list of them) for training
    c.data.validation_files = ""  # text/jsonl: file or glob for validation
    c.data.text_field = "text"  # jsonl/tfds: the field holding the text
    c.data.encoding_errors = "strict"  # bad UTF-8 in text/jsonl: "strict" (error naming file and line) or "replace"
    c.data.tfds_name = ""  # tfds: dataset name, e.g. "lm1b"
    c.data.tfds_data_dir = ""  # tfds: directory holding the prepared dataset
    c.data.train_split = "train"  # tfds: split for training
    c.data.validation_split = "test"  # tfds: split for eval
    c.data.tokenizer = ""  # tokenizer.json or SentencePiece .model ("" = the bundled 2048-token BPE)
    c.data.format = "text"  # text | chat (JSONL conversations) | prompt_completion (JSONL): training.sft_data
    c.data.train_on = "assistant"  # chat / prompt_completion: the loss on the assistant's tokens | "all"
    c.data.overlong = "truncate"  # chat / prompt_completion: a record longer than seq_len is cut ("truncate") | "drop"

    c.mesh = ml_collections.ConfigDict()  # device mesh (common.sharding); sizes multiply to the device count
    c.mesh.data = -1  # data parallel (-1 = the devices the other axes leave)
    c.mesh.fsdp = 1  # batch split + parameters sharded over `embed` (ZeRO-3)
    c.mesh.context = 1  # each row's tokens split in slices (context parallelism: long rows)
    c.mesh.expert = 1  # batch split + experts split (all-to-all expert parallelism)
    c.mesh.tensor = 1  # heads / MLP hidden / Mamba d_inner / vocab split (Megatron)
    c.mesh.rules = ml_collections.ConfigDict()  # {logical axis: mesh axes} overriding sharding.DEFAULT_RULES

    c.distributed = ml_collections.ConfigDict()  # multi-host start-up (training.distributed)
    c.distributed.initialize = False  # join a cluster (auto-detected on TPU pods / SLURM when no address)
    c.distributed.coordinator_address = ""  # "host:port" of process 0 for an explicit cluster
    c.distributed.num_processes = -1  # explicit cluster: number of processes
    c.distributed.process_id = -1  # explicit cluster: this process's index
    return c


def lm_start_fields(config):
    """The Jamba LM task's fields for starting from a checkpoint (fine-tuning); a config adds them."""
    config.init_from = ""  # HF directory, converted orbax directory or training workdir to start from ("": init)
    config.init_step = -1  # init_from a training workdir: its step (-1: the newest intact one)
    config.lora = ml_collections.ConfigDict()  # LoRA adapters on a frozen init_from (jamba_jax.lora)
    config.lora.rank = 0  # 0: full fine-tuning (no adapters)
    config.lora.alpha = 16.0  # the update is scaled by alpha / rank
    config.lora.dropout = 0.0  # dropout on the adapters' input in training
    config.lora.targets = "q_proj,k_proj,v_proj,o_proj,in_proj,out_proj"  # jamba_jax.lora.TARGETS, comma-separated
    config.lora.base_quantize = ""  # "experts_int8": the frozen base's expert and MLP weights in int8
    return config
