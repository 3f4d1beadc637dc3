"""LoRA chat fine-tuning of the quick start's tiny Jamba on this CPU (the README's fine-tuning example):

  python main.py                                        # the quick start: a tiny Jamba in ./workdir
  python -m data.build_chat                             # chat_data/{train,validation}.jsonl from WordNet
  python main.py --config=jamba_tiny_lora --workdir=workdir_chat
  python main.py --config=generate --config.checkpoint=workdir_chat --config.chat=True --config.prompt="Define dog."

The base is the quick start's run (its newest checkpoint, frozen); rank-8 adapters on every projection
but dt_proj learn the definitions' chat format, the loss on the assistant's tokens only.
"""

from configs import jamba_tiny


def get_config():
    config = jamba_tiny.get_config()
    config.init_from = "workdir"  # the quick start's run
    config.num_train_steps = 200  # a few minutes on 2 CPU cores
    config.learning_rate = 3e-3  # LoRA on a tiny model likes a high rate
    config.warmup_steps = 20  # linear warmup
    config.weight_decay = 0.0  # adapters start at zero; no decay
    config.eval_every_steps = 100  # eval cadence
    config.save_every_steps = 100  # checkpoint cadence
    config.sample_prompt = ""  # (a chat model is asked with configs/generate.py --config.chat=True)
    config.data.source = "jsonl"  # data/build_chat.py's output
    config.data.format = "chat"  # rendered with the tokenizer's chat template
    config.data.train_files = "chat_data/train.jsonl"
    config.data.validation_files = "chat_data/validation.jsonl"
    config.lora.rank = 8  # adapter rank
    config.lora.alpha = 16.0  # update scale alpha / rank = 2
    config.lora.targets = ("q_proj,k_proj,v_proj,o_proj,in_proj,x_proj,out_proj,gate_proj,up_proj,down_proj,"
                           "experts.gate_proj,experts.up_proj,experts.down_proj")
    return config
