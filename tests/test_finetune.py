"""Fine-tuning a released Jamba: starting from a checkpoint transformers wrote (step-0 loss equal to
transformers'), LoRA chat fine-tuning on a frozen (int8) base, on one device and on a mesh, exports that
transformers and peft load with our logits, chat generation from the run, the Mini configs' dry runs, and
bad inputs through main.py (chat rendering itself: tests/test_sft_data.py)."""

import gzip
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
from test_sft_data import CONVERSATIONS
from test_training import read_metrics, small_config, train_losses

import jamba_jax
from common.tokenizers import load_tokenizer
from jamba_jax.lora import LoraConfig, LoraError, init_adapters, merged_weights, with_adapters
from tasks.jamba_lm import JambaLMTask
from training import train
from training.data import make_iterator


def ft_config(init_from, chat=None, **overrides):
    c = small_config(**overrides)
    c.init_from = init_from
    if chat:
        c.data.source, c.data.format, c.data.train_files, c.data.validation_files = "jsonl", "chat", chat, chat
    return c


def single_device(tree):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: dev, tree)


def test_step_zero_loss_from_a_transformers_checkpoint_equals_transformers(hf_dir, tmp_path):
    hf, path = hf_dir
    with gzip.open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "wordnet_corpus",
                                "train.txt.gz"), "rt") as f:
        lines = f.read().splitlines()[:3000]
    docs = tmp_path / "docs.txt"  # long documents: each packed row is one document's piece (transformers: no packing)
    docs.write_text("".join(" ".join(lines[i:i + 30]) + "\n" for i in range(0, 3000, 30)))
    c = ft_config(path, **{"data.source": "text", "data.train_files": str(docs), "data.validation_files": str(docs)})
    task = JambaLMTask(c)
    assert task.cfg.hidden_size == hf.config.hidden_size and task.tokenizer_path.startswith(path)  # the checkpoint's
    params = task.initial_params(single_device(jax.eval_shape(task.init_params, jax.random.PRNGKey(0))))
    batch = next(make_iterator(task.train_dataset(0, 1)))
    assert (batch["segment_ids"] == 1).all()
    sums = task.sums(params, batch, None, None)
    with torch.no_grad():
        ids = torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long)
        want = float(hf(ids, labels=ids).loss)
    np.testing.assert_allclose(float(sums["loss"] / sums["tokens"]), want, rtol=0, atol=1e-4)


def test_full_fine_tuning_resumes_from_its_own_checkpoint_not_init_from(hf_dir, chat_file, tmp_path):
    import tasks
    from common.checkpoints import restore_run_params

    hf, path = hf_dir
    shutil.copytree(path, tmp_path / "hf")
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    tasks.run(ft_config(path, chat_file), full)
    config = ft_config(str(tmp_path / "hf"), chat_file)
    train.run(JambaLMTask(config), config, resumed, stop_after=10)
    with torch.no_grad():  # the start's weights change after step 10: the resumed run must not see it
        hf.lm_head.weight.mul_(2.0)
        hf.save_pretrained(str(tmp_path / "hf"))
        hf.lm_head.weight.mul_(0.5)
    tasks.run(ft_config(str(tmp_path / "hf"), chat_file), resumed)
    a, b = train_losses(full), train_losses(resumed)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)] and a[1] == b[1]
    provenance = restore_run_params(resumed, None)[0]["provenance"]
    assert provenance["init_from"] == str(tmp_path / "hf") and len(provenance["digest"]) == 32


def test_a_start_takes_the_checkpoints_model_and_refuses_weight_changes(hf_dir):
    _, path = hf_dir
    c = ft_config(path, **{"model.dtype": "bfloat16", "model.remat_policy": "full", "model.hidden_size": 64})
    task = JambaLMTask(c)  # the config file's hidden size gives way; numerics and remat apply
    assert (task.cfg.hidden_size, task.cfg.dtype, task.cfg.remat_policy) == (32, "bfloat16", "full")
    c.cli_overrides = ("model.dtype", "model.hidden_size")
    with pytest.raises(jamba_jax.ConfigError, match="--config.model.hidden_size would change the weights"):
        JambaLMTask(c)
    with pytest.raises(jamba_jax.CheckpointError, match="is not a directory"):
        JambaLMTask(ft_config(path + "_missing"))


def test_lora_starts_as_the_base_and_only_adapters_have_gradients(hf_dir):
    _, path = hf_dir
    cfg, base = jamba_jax.load_checkpoint(path)
    lora = LoraConfig(rank=4, targets=("q_proj", "in_proj", "x_proj", "dt_proj", "out_proj", "gate_proj",
                                        "experts.gate_proj", "experts.down_proj"))
    adapters = init_adapters(cfg, lora, jax.random.PRNGKey(1))
    model = jamba_jax.JambaForCausalLM(cfg)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 2048, (2, 12)))
    plain = model.apply({"params": base}, ids).logits
    np.testing.assert_array_equal(np.asarray(model.apply({"params": with_adapters(base, adapters, 4.0)}, ids).logits),
                                  np.asarray(plain))  # B = 0: exactly the base
    grads = jax.grad(lambda a: jnp.sum(model.apply({"params": with_adapters(base, a, 4.0)}, ids).logits ** 2))(
        adapters)
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert leaves and all(jax.tree_util.keystr(p).endswith(("_lora_a']", "_lora_b']")) for p, _ in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for p, g in leaves if jax.tree_util.keystr(p).endswith("_lora_b']"))
    with pytest.raises(LoraError, match=r"config.lora: targets \['mlp_proj'\] are not targets"):
        LoraConfig.from_config({"rank": 4, "targets": "q_proj,mlp_proj"})


PEFT_TARGETS = "q_proj,k_proj,v_proj,o_proj,in_proj,x_proj,out_proj,gate_proj,up_proj,down_proj," \
               "experts.gate_proj,experts.up_proj,experts.down_proj"  # every target but dt_proj


def lora_config(path, chat, **overrides):
    return ft_config(path, chat, **{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": PEFT_TARGETS,
                                    "num_train_steps": 20, "save_every_steps": 10, "eval_every_steps": 20,
                                    "seq_len": 64, "batch_size": 16, "learning_rate": 3e-2, **overrides})


def file_hashes(path):
    import hashlib

    return {f: hashlib.sha256((path_ := os.path.join(path, f)) and open(path_, "rb").read()).hexdigest()
            for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def lora_run(hf_dir, chat_file, tmp_path_factory):
    """A LoRA chat fine-tuning run on every target PEFT can hold (20 steps), the base's file hashes before it."""
    _, path = hf_dir
    before = file_hashes(path)
    workdir = str(tmp_path_factory.mktemp("lora"))
    import tasks

    tasks.run(lora_config(path, chat_file), workdir)
    return workdir, before


def test_lora_chat_fine_tuning_learns_leaves_the_base_alone_and_resumes_exactly(hf_dir, chat_file, lora_run,
                                                                                 tmp_path):
    _, path = hf_dir
    workdir, before = lora_run
    losses = train_losses(workdir)
    # the assistant tokens' loss: 8.2 at the start (a random base), about 0.6 lower after 20 steps
    assert np.mean([losses[s] for s in (18, 19, 20)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.3, losses
    assert file_hashes(path) == before  # the base's files: untouched
    source = jamba_jax.locate_checkpoint(workdir)
    cfg, base, adapters, lora = jamba_jax.checkpoint.load_lora_run(source)
    assert lora.rank == 4 and len(lora.targets) == 13
    leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]  # the run's checkpoint holds the adapters only
    assert leaves and all(jax.tree_util.keystr(p).endswith(("_lora_a']", "_lora_b']")) for p, _ in leaves)
    _, fresh = jamba_jax.load_checkpoint(path)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base as loaded: bit-identical
    assert all(float(jnp.abs(b).max()) > 0 for p, b in leaves if jax.tree_util.keystr(p).endswith("_lora_b']"))
    resumed = str(tmp_path / "resumed")  # "killed" after step 10, then run again
    config = lora_config(path, chat_file)
    train.run(JambaLMTask(config), config, resumed, stop_after=10)
    import tasks

    tasks.run(lora_config(path, chat_file), resumed)
    again = train_losses(resumed)
    assert [losses[s] for s in range(11, 21)] == [again[s] for s in range(11, 21)]  # bit for bit
    assert [m for m in read_metrics(workdir) if "eval_loss" in m]


def our_logits(workdir, ids, merged=False):
    """Our model on the run's base with its adapters beside it, or on the merged weights `load_checkpoint`
    gives for the workdir (what the merged export writes)."""
    if merged:
        cfg, params = jamba_jax.load_checkpoint(workdir)
    else:
        cfg, base, adapters, lora = jamba_jax.checkpoint.load_lora_run(jamba_jax.locate_checkpoint(workdir))
        params = with_adapters(base, adapters, lora.scale)
    return np.asarray(jamba_jax.JambaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)).logits)


def test_merged_export_loads_in_transformers_with_our_logits(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import convert

    workdir, _ = lora_run
    dst = str(tmp_path / "merged")
    assert convert.main(["orbax-to-hf", "--src", workdir, "--dst", dst]) == 0
    ids = np.random.RandomState(1).randint(3, 2048, (2, 24))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(dst).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, our_logits(workdir, ids, merged=True), rtol=0, atol=1e-4)
    np.testing.assert_allclose(theirs, our_logits(workdir, ids), rtol=0, atol=1e-4)  # merged or not
    hf_tok = AutoTokenizer.from_pretrained(dst)  # the tokenizer and its chat template came along
    ours = load_tokenizer("", 2048)
    assert hf_tok.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=True)["input_ids"] == \
        ours.encode_chat(CONVERSATIONS[0])[0]


def test_peft_adapter_loads_with_peft_and_gives_our_logits(hf_dir, lora_run, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    from tasks import convert

    _, path = hf_dir
    workdir, _ = lora_run
    dst = str(tmp_path / "adapter")
    assert convert.main(["orbax-to-hf", "--src", workdir, "--dst", dst, "--adapter"]) == 0
    assert "step 20" in capsys.readouterr().out
    assert sorted(os.listdir(dst)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    model = peft.PeftModel.from_pretrained(base, dst).eval()
    from safetensors.numpy import load_file

    ours = set(load_file(os.path.join(dst, "adapter_model.safetensors")))
    theirs = {k.replace(".default", "") for k in peft.get_peft_model_state_dict(model)}
    assert ours == theirs  # every tensor we wrote is one peft made a place for, and none is missing
    ids = np.random.RandomState(2).randint(3, 2048, (2, 24))
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, our_logits(workdir, ids), rtol=0, atol=1e-4)


def test_every_target_exports_exactly_merged_and_all_but_dt_proj_as_peft(hf_dir, tmp_path):
    """Random (non-zero) adapters on all 14 targets: the merged export in transformers and the PEFT adapter in
    peft give our logits; dt_proj, which transformers' Jamba reads around peft's layer, is refused as PEFT."""
    import peft
    from transformers import AutoModelForCausalLM

    from jamba_jax.peft_adapter import save_peft_adapter

    _, path = hf_dir
    cfg, base = jamba_jax.load_checkpoint(path)
    model = jamba_jax.JambaForCausalLM(cfg)
    ids = np.random.RandomState(2).randint(3, 2048, (2, 12))
    lora = LoraConfig(rank=4, alpha=8.0, targets=tuple(PEFT_TARGETS.split(",")) + ("dt_proj",))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(jax.random.PRNGKey(len(jax.tree_util.keystr(p))), x.shape)
        if jax.tree_util.keystr(p).endswith("_lora_b']") else x, init_adapters(cfg, lora, jax.random.PRNGKey(0)))
    ours = np.asarray(model.apply({"params": with_adapters(base, adapters, lora.scale)}, jnp.asarray(ids)).logits)
    assert np.abs(ours - np.asarray(model.apply({"params": base}, jnp.asarray(ids)).logits)).max() > 1
    jamba_jax.save_hf_checkpoint(cfg, merged_weights(cfg, base, adapters, lora.scale), str(tmp_path / "merged"))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(torch.tensor(ids)).logits
    np.testing.assert_allclose(merged.numpy(), ours, rtol=0, atol=1e-4)
    with pytest.raises(jamba_jax.CheckpointError, match="a dt_proj adapter has no PEFT form"):
        save_peft_adapter(cfg, lora, adapters, str(tmp_path / "refused"), path)
    assert not os.path.exists(tmp_path / "refused")
    no_dt = LoraConfig(rank=4, alpha=8.0, targets=lora.targets[:-1])
    adapters = jax.tree_util.tree_map_with_path(lambda p, x: x, adapters)
    for stack in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, dict) and "dt_proj_kernel_lora_a" in x):
        if isinstance(stack, dict):
            del stack["dt_proj_kernel_lora_a"], stack["dt_proj_kernel_lora_b"]
    ours = np.asarray(model.apply({"params": with_adapters(base, adapters, lora.scale)}, jnp.asarray(ids)).logits)
    save_peft_adapter(cfg, no_dt, adapters, str(tmp_path / "adapter"), path)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path).eval(),
                                                str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(torch.tensor(ids)).logits.numpy(), ours, rtol=0, atol=1e-4)


def test_lora_on_8_devices_fsdp_x_expert_equals_one_device(hf_dir, chat_file, tmp_path):
    """Adapters on attention, Mamba, the dense MLP and the experts (sharded with them), on a chat file."""
    from test_sharding import assert_same_run, run_worker

    _, path = hf_dir
    extra = ("--lora-from", path, "--chat", chat_file)
    one = run_worker(tmp_path / "one", 1, {"data": 1}, *extra)
    assert_same_run(run_worker(tmp_path / "eight", 8, {"fsdp": 2, "expert": 4}, *extra), one)


def test_lora_on_an_int8_base_starts_as_the_int8_model_and_exports_dequantised(hf_dir, chat_file, tmp_path):
    import tasks

    _, path = hf_dir
    c = lora_config(path, chat_file, **{"lora.base_quantize": "experts_int8", "num_train_steps": 4,
                                        "save_every_steps": 4, "eval_every_steps": 4})
    task = JambaLMTask(c)
    frozen = task.frozen_inputs()
    base = frozen.load(single_device(frozen.arrays))
    cfg, fresh = jamba_jax.load_checkpoint(path)
    experts = base["model"]["layers_0"]["feed_forward"]["experts"]
    assert experts["gate_proj"].dtype == jnp.int8 and experts["gate_proj_scale"].dtype == jnp.float32
    adapters = task.init_params(jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    ids = jnp.asarray(np.random.RandomState(3).randint(3, 2048, (2, 16)))
    int8_model = task.model.apply({"params": jamba_jax.quantize_experts_int8(cfg, fresh)}, ids).logits
    np.testing.assert_array_equal(np.asarray(task.model.apply({"params": task.model_params(adapters, base)},
                                                              ids).logits), np.asarray(int8_model))  # B = 0
    workdir = str(tmp_path / "w")
    tasks.run(c, workdir)
    merged_cfg, merged = jamba_jax.load_checkpoint(workdir)  # the merged weights, dequantised: a float model
    assert merged["model"]["layers_0"]["feed_forward"]["experts"]["gate_proj"].dtype == jnp.float32
    assert "gate_proj_scale" not in merged["model"]["layers_0"]["feed_forward"]["experts"]
    np.testing.assert_allclose(np.asarray(jamba_jax.JambaForCausalLM(merged_cfg).apply({"params": merged}, ids).logits),
                               our_logits(workdir, np.asarray(ids)), rtol=0, atol=1e-4)


def test_chat_generation_reads_a_lora_workdir(lora_run):
    """configs/generate.py with chat=True on a LoRA run: the base with the adapters merged, the run's tokenizer and
    chat template; it prints the greedy reply our model gives the rendered conversation."""
    from test_user_errors import MAIN, ROOT, run

    workdir, _ = lora_run
    out, _ = run(MAIN, f"--config={ROOT}/configs/generate.py", f"--config.checkpoint={workdir}", "--config.chat=True",
                 "--config.system=Answer briefly.", "--config.prompt=Define dog.", "--config.max_new_tokens=6")
    assert out.returncode == 0, out.stderr[-2000:]
    cfg, params = jamba_jax.load_checkpoint(workdir)
    tok = load_tokenizer("", 2048)
    ids, _ = tok.encode_chat([{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "Define dog."}], add_generation_prompt=True)
    new = jamba_jax.generate(jamba_jax.JambaForCausalLM(cfg), params, jnp.asarray([ids]), max_new_tokens=6,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0]
    assert out.stdout == tok.decode([int(i) for i in new if i != tok.pad_id]) + "\n"


def test_the_server_serves_a_lora_workdir_with_its_adapters_merged(lora_run):
    """configs/serve.py on a LoRA run: the openai client's chat reply is the merged model's greedy reply."""
    from configs import serve
    from serving.server import ServerThread
    from tasks.serve import build_engine

    workdir, _ = lora_run
    config = serve.get_config()
    config.update(checkpoint=workdir, max_model_len=64, max_num_seqs=2, prefill_chunk=16, model_name="lora")
    engine, _, _ = build_engine(config)
    engine.warmup()
    messages = [{"role": "user", "content": "Define dog."}]
    with ServerThread(engine, "lora") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="lora", messages=messages, max_tokens=6, temperature=0)
    cfg, params = jamba_jax.load_checkpoint(workdir)
    tok = load_tokenizer("", 2048)
    new = jamba_jax.generate(jamba_jax.JambaForCausalLM(cfg), params,
                             jnp.asarray([tok.encode_chat(messages, add_generation_prompt=True)[0]]), max_new_tokens=6,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0].tolist()
    assert reply.choices[0].message.content == tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)


def test_mini_lora_dry_runs_optimizer_state_is_under_one_percent_and_qlora_fits_one_80gb_device(tmp_path):
    import tasks
    from configs import jamba_mini_lora, jamba_mini_qlora, jamba_mini_sft

    reports = {}
    for name, module in (("sft", jamba_mini_sft), ("lora", jamba_mini_lora), ("qlora", jamba_mini_qlora)):
        config = module.get_config()
        config.dry_run, config.dry_run_devices = True, 8 if name != "qlora" else 1
        reports[name] = tasks.run(config, str(tmp_path))
    assert reports["lora"]["opt_state_bytes"] < 0.01 * reports["sft"]["opt_state_bytes"]
    q = reports["qlora"]
    total = (2 * q["param_bytes_per_device"] + q["opt_state_bytes_per_device"] + q["activation_bytes_per_device"]
             + q["frozen_bytes_per_device"])
    assert 40 * 2**30 < q["frozen_bytes_per_device"] and total < 0.9 * 80e9  # the int8 base and an 8K row: one GPU
    assert not os.listdir(tmp_path)


def test_chat_generation_stops_at_the_checkpoints_end_tokens(hf_dir, tmp_path):
    from jamba_jax.checkpoint import checkpoint_end_tokens

    _, path = hf_dir
    tok = load_tokenizer("", 2048)
    shutil.copytree(path, tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ends = checkpoint_end_tokens(jamba_jax.locate_checkpoint(str(tmp_path / "hf")), tok)
    assert ends == [2, 7]  # <eos>, end of message
