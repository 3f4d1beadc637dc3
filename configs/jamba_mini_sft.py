"""Full fine-tuning of Jamba-1.5-Mini on chat data, on a pod: every weight trained (float32 master weights,
bfloat16 compute), FSDP over the slice with the experts across 8 devices.

  python main.py --config=jamba_mini_sft --config.init_from=/path/to/AI21-Jamba-1.5-Mini \\
      --config.data.train_files=train.jsonl --config.data.validation_files=validation.jsonl

init_from is the Hugging Face directory (config.json, safetensors, tokenizer.json, tokenizer_config.json with
its chat template): the model, tokenizer and chat template come from it (tasks/jamba_lm.py). The state
(parameters, gradients, Adam) is 16 bytes a parameter, about 780 GiB: it needs a pod; the README's dry-run
table says how it spreads.
"""

from configs import jamba_mini


def get_config():
    config = jamba_mini.get_config()
    config.num_train_steps = 2000  # optimizer steps (epochs x conversations / batch_size)
    config.batch_size = 64  # conversations packed into rows of seq_len
    config.seq_len = 8192  # tokens per row
    config.learning_rate = 1e-5  # fine-tuning: a small peak rate
    config.warmup_steps = 50  # linear warmup
    config.min_lr_ratio = 0.1  # cosine to 1e-6
    config.weight_decay = 0.0  # no decay away from the released weights
    config.activation_loss_coef = 0.0  # pre-training's activation loss: off for fine-tuning
    config.eval_every_steps = 200  # eval cadence
    config.save_every_steps = 200  # checkpoint cadence
    config.init_from = ""  # required: the Jamba-1.5-Mini Hugging Face directory
    config.data.source = "jsonl"  # conversations, one per line
    config.data.format = "chat"  # rendered with the checkpoint's chat template
    config.data.train_on = "assistant"  # the loss on the assistant's tokens
    config.data.train_files = ""  # required: train.jsonl (or a glob)
    config.data.validation_files = ""  # required: validation.jsonl
    config.mesh.data = 1  # pod mesh: FSDP over the slice, experts across 8 devices
    config.mesh.fsdp = -1
    config.mesh.expert = 8
    return config
