"""`jgoat train --task sft|image` end to end on tiny checkpoints written by transformers, prompt masking against an
independent torch computation, config files, TensorBoard files (read by tensorboard) and the PEFT export (loaded by
peft, logits equal to jgoat's)."""

import json
import pathlib

import jax
import numpy as np
import pytest

import jgoat
from jgoat import cli, tasks
from jgoat import data as data_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "next", "after", "is", "be",
         "brief", *NUMBERS]


def sft_rows(n=40):
    return [{"prompt": f"next after {NUMBERS[i % 9]}", "response": f"{NUMBERS[i % 9 + 1]} is next" * (1 + i % 2)}
            for i in range(n)]


def write_tiny_llama(model_dir: pathlib.Path, data_jsonl: pathlib.Path) -> None:
    """A tiny random Llama with a word-level tokenizer and chat template in `model_dir`, and `data_jsonl`: the
    prompt/response rows of :func:`sft_rows`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    with open(data_jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sft_rows())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    write_tiny_llama(root / "model", root / "train.jsonl")
    return root


def test_prompt_masked_loss_equals_torch_on_response_tokens(llama_dir):
    from jgoat.models import from_pretrained, load_tokenizer

    tok = load_tokenizer(llama_dir / "model")
    rows = sft_rows(4)
    table = data_lib.load_table(str(llama_dir / "train.jsonl")).select(range(4))
    arrays = data_lib.sft_arrays(tok, table, max_length=16)
    model, params, _ = from_pretrained(llama_dir / "model")
    jgoat_loss, aux = tasks.loss("sft", model, params, arrays, None)

    torch_model = transformers.LlamaForCausalLM.from_pretrained(llama_dir / "model").eval()
    nll, count = 0.0, 0
    for i, row in enumerate(rows):  # independent: the rendered prompt and response tokenised on their own
        prompt = tok(f"<|user|> {row['prompt']} </s> <|assistant|> ", add_special_tokens=False)["input_ids"]
        response = tok(f"{row['response']} </s> ", add_special_tokens=False)["input_ids"]
        full = prompt + response
        np.testing.assert_array_equal(arrays["ids"][i, :len(full)], full)
        assert arrays["mask"][i].sum() == len(full) and (arrays["labels"][i, :len(prompt)] == -100).all()
        with torch.no_grad():
            logits = torch_model(torch.tensor([full])).logits[0].double()
        targets = torch.tensor(response)
        nll += float(torch.nn.functional.cross_entropy(logits[len(prompt) - 1:len(full) - 1], targets,
                                                       reduction="sum"))
        count += len(response)
    assert float(aux) == 0.0
    np.testing.assert_allclose(float(jgoat_loss), nll / count, rtol=1e-5)
    # Without the masking (loss on every real token), the value would differ: the test can tell them apart.
    unmasked = {**arrays, "labels": np.where(arrays["mask"] == 1, arrays["ids"], -100)}
    assert abs(float(tasks.loss("sft", model, params, unmasked, None)[0]) - nll / count) > 1e-3
    # KaSA's regulariser is part of the training loss (the plain base has none: the loss above is the NLL alone).
    from jgoat.models import causal_lm_loss

    kasa = jgoat.wrap(params, jgoat.KasaConfig(rank=4, alpha=8), key=jax.random.key(0))
    reg = float(jgoat.regularizer(kasa))
    logits = jgoat.apply(model.apply)({"params": kasa}, arrays["ids"], arrays["mask"])[0].logits
    assert reg > 1e-3  # B = 0 at init: γ·‖BBᵀ − I‖_F = 1e-3 · √4 per layer and module alone
    np.testing.assert_allclose(float(tasks.loss("sft", model, kasa, arrays, None)[0]),
                               float(causal_lm_loss(logits, arrays["labels"])) + reg, rtol=1e-6)


def test_chat_messages_train_only_assistant_turns(llama_dir):
    from jgoat.models import load_tokenizer

    tok = load_tokenizer(llama_dir / "model")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "next after one"},
                {"role": "assistant", "content": "two"}, {"role": "user", "content": "next after two"},
                {"role": "assistant", "content": "three is next"}]
    ex = data_lib.tokenize_sft(tok, messages=messages)
    words = tok.convert_ids_to_tokens(list(ex.ids))
    trained = [w for w, label in zip(words, ex.labels, strict=True) if label != -100]
    assert trained == ["two", "</s>", "three", "is", "next", "</s>"]
    assert [i for i, label in zip(ex.ids, ex.labels, strict=True) if label != -100] == \
        tok.convert_tokens_to_ids(trained)
    # No template: prompt (with the tokenizer's specials) + response + EOS, the response and EOS trained.
    plain = data_lib.tokenize_sft(tok, prompt="next after one", response="two", use_chat_template=False)
    assert tok.convert_ids_to_tokens(list(plain.ids)) == ["next", "after", "one", "two", "</s>"]
    assert plain.labels[:3] == (-100,) * 3 and plain.labels[3:] == plain.ids[3:]


def test_config_file_values_and_command_line_override(tmp_path):
    parser = cli.build_parser()
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"_comment": "ignored", "task": "sft", "lr": 2e-5, "batch_size": 16,
                                  "targets": ["q_proj", "v_proj"], "no-baseline": True, "resume": False,
                                  "epochs": 3}))
    # The command line overrides the file wherever --config stands.
    for argv in (["train", "--config", str(config), "--batch-size", "8"],
                 ["train", "--batch-size", "8", f"--config={config}"]):
        args = parser.parse_args(argv)
        assert (args.task, args.lr, args.batch_size, args.targets) == ("sft", 2e-5, 8, ("q_proj", "v_proj"))
        assert not args.baseline and not args.resume and args.epochs == 3 and args.steps == 300
    # Booleans are switches both ways: the command line turns a config's true off and its false on.
    config.write_text(json.dumps({"resume": True, "no_chat_template": True, "no_baseline": False,
                                  "aux_count_padding": None}))
    assert cli.read_config(config) == {"resume": True, "chat_template": False, "baseline": True}
    args = parser.parse_args(["train", "--config", str(config), "--no-resume", "--chat-template"])
    assert not args.resume and args.chat_template and args.baseline and not args.aux_count_padding
    for bad, message in (({"resume": "maybe"}, "'resume' takes true or false, got 'maybe'"),
                         ({"rank": True}, 'key "rank"'),
                         ({"learning_rate": 1e-4}, "'learning_rate' is not accepted"),
                         ({"method": "lorra"}, "'lorra' not among choices")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(jgoat.JgoatError, match=message):
            parser.parse_args(["train", "--config", str(tmp_path / "bad.json")])
    yaml = pytest.importorskip("yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"rank": 8, "alpha": 16}, sort_keys=False))
    args = parser.parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--alpha", "4"])
    assert (args.rank, args.alpha) == (8, 4.0)


def tb_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_sft_cli_epochs_grad_accum_tensorboard_and_peft_export(llama_dir, tmp_path):
    pytest.importorskip("tensorboard")
    peft = pytest.importorskip("peft")
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({"task": "sft", "model": str(llama_dir / "model"),
                                  "data": str(llama_dir / "train.jsonl"), "method": "lora", "rank": 4, "alpha": 8,
                                  "lr": 1e-2, "epochs": 5, "batch_size": 8, "max_length": 16, "test_size": 8}))
    out = tmp_path / "run"
    # The command line overrides the file: 2 epochs instead of 5; 32 train examples / 8 = 4 steps per epoch.
    assert cli.main(["train", "--config", str(config), "--epochs", "2", "--grad-accum", "2", "--out", str(out),
                     "--save-every", "100"]) == 0
    run_dir = out / "lora"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "task_loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [(r["step"], r["epoch"]) for r in evals] == [(4, 1.0), (8, 2.0)]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # it learns the toy mapping
    np.testing.assert_allclose(evals[-1]["eval/perplexity"], np.exp(evals[-1]["eval/loss"]), rtol=1e-6)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["eval_loss"] == evals[-1]["eval/loss"] and result["steps"] == 8
    baseline, tuned = json.loads((out / "results.json").read_text())  # the base model's own eval comes first
    assert baseline["method"] == "base" and tuned["method"] == "lora"
    assert baseline["eval_loss"] > evals[0]["eval/loss"] > tuned["eval_loss"]
    assert (run_dir / "training.png").stat().st_size > 0

    scalars = tb_scalars(run_dir / "tensorboard")  # tensorboard's own reader
    assert [s for s, _ in scalars["task_loss"]] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in scalars["task_loss"]], [r["task_loss"] for r in train_rows],
                               rtol=1e-6)
    assert scalars["eval/loss"] == [(4, pytest.approx(evals[0]["eval/loss"], rel=1e-6)),
                                    (8, pytest.approx(evals[1]["eval/loss"], rel=1e-6))]

    # The PEFT export loads in peft on the torch model and gives the logits of jgoat's final adapters.
    from jgoat.models import from_pretrained

    model, params, _ = from_pretrained(llama_dir / "model")
    cfg = jgoat.LoraConfig(rank=4, alpha=8, targets="all-linear")
    final, _, record = jgoat.restore(run_dir / "checkpoints", jgoat.wrap(params, cfg, key=jax.random.key(0)))
    assert record["step"] == 8
    ids = np.asarray([[1, 4, 7, 8, 12, 2, 5, 13, 9]], np.int32)
    ours = np.asarray(jgoat.apply(model.apply)({"params": final}, ids)[0].logits)
    base = np.asarray(model.apply({"params": params}, ids).logits)
    torch_base = transformers.LlamaForCausalLM.from_pretrained(llama_dir / "model").eval()
    peft_model = peft.PeftModel.from_pretrained(torch_base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - base).max() > 1e-2  # the adapters trained
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_sft_sigkill_resume_with_grad_accum_and_epochs_is_exact(llama_dir, tmp_path):
    """The classify resume test (test_cli.py) for the SFT path: token-weighted accumulation, epoch reshuffles and
    GOAT's dropout keys must all continue exactly where the killed run stopped."""
    import os
    import subprocess
    import sys

    def run(out, *extra, kill=None):
        launcher = ["-m", "jgoat"] if kill is None else [str(pathlib.Path(__file__).parent / "faults.py"), str(kill),
                                                         "begin"]
        cmd = [sys.executable, *launcher, "train", "--task", "sft", "--model", str(llama_dir / "model"),
               "--data", str(llama_dir / "train.jsonl"), "--out", str(out), "--method", "goat", "--rank", "4",
               "--experts", "2", "--top-k", "1", "--adapter-dropout", "0.1", "--epochs", "3", "--batch-size", "8",
               "--grad-accum", "2", "--max-length", "16", "--test-size", "8", "--save-every", "3", "--no-baseline",
               *extra]  # 32 train examples / 8 = 4 steps per epoch: 12 steps, epochs end at 4, 8, 12
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    straight = run(tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path / "b", kill=7)  # tests/faults.py: SIGKILL before step 8, after the step-6 save
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert jgoat.latest_step(tmp_path / "b" / "goat" / "checkpoints") == 6
    resumed = run(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stdout

    def final(out):
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(os.path.abspath(out / "goat" / "checkpoints")) as mngr:
            step = mngr.latest_step()
            restored = mngr.restore(step, args=ocp.args.Composite(adapter=ocp.args.StandardRestore()))
        rows = [json.loads(line) for line in (out / "goat" / "metrics.jsonl").read_text().splitlines()]
        return step, {k: np.asarray(v) for k, v in restored["adapter"].items()}, rows

    (step_a, a, rows_a), (step_b, b, rows_b) = final(tmp_path / "a"), final(tmp_path / "b")
    assert step_a == step_b == 12 and a.keys() == b.keys()
    for name in a:  # bit-identical: same batches, same dropout keys, same compiled step
        np.testing.assert_array_equal(a[name], b[name])
    evals = [(r["step"], r["eval/loss"]) for r in rows_a if "eval/loss" in r]
    assert [s for s, _ in evals] == [4, 8, 12]
    assert [(r["step"], r["eval/loss"]) for r in rows_b if "eval/loss" in r] == evals  # the step-4 one from before
    assert [r["step"] for r in rows_b if "task_loss" in r] == list(range(1, 13))


def sft_cli(llama_dir, out, *extra):
    """A short `jgoat train --task sft` run on the tiny Llama (4 steps, no baseline); returns <out>."""
    assert cli.main(["train", "--task", "sft", "--model", str(llama_dir / "model"), "--data",
                     str(llama_dir / "train.jsonl"), "--out", str(out), "--steps", "4", "--batch-size", "8",
                     "--max-length", "16", "--test-size", "8", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
                     "--no-baseline", *extra]) == 0
    return out


def final_tree(run_dir, template):
    tree, _, record = jgoat.restore(run_dir / "checkpoints", template)
    return tree, record


def base_logits_and_ids(llama_dir):
    from jgoat.models import from_pretrained

    model, params, config = from_pretrained(llama_dir / "model")
    return model, params, config, np.asarray([[1, 4, 7, 8, 12, 2, 5, 13, 9]], np.int32)


@pytest.mark.parametrize("method, cfg", [
    ("kasa", jgoat.KasaConfig(rank=4, alpha=8)),
    ("ia3", jgoat.IA3Config()),  # --targets not given: peft's Llama defaults (k_proj, v_proj, down_proj)
])
def test_sft_cli_kasa_ia3_train_and_export_to_peft(llama_dir, tmp_path, method, cfg):
    peft = pytest.importorskip("peft")
    run_dir = sft_cli(llama_dir, tmp_path, "--method", method) / method
    model, params, _, ids = base_logits_and_ids(llama_dir)
    initial = jgoat.wrap(params, cfg, key=jax.random.key(0))
    final, record = final_tree(run_dir, initial)
    assert record["step"] == 4
    changed = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(jgoat.split(final)[0]), jax.tree.leaves(jgoat.split(initial)[0]),
                               strict=True)]
    assert min(changed) > 0  # every trainable leaf moved (KaSA's A, B, Δ; every IA³ vector)
    ours = np.asarray(jgoat.apply(model.apply)({"params": final}, ids)[0].logits)
    torch_base = transformers.LlamaForCausalLM.from_pretrained(llama_dir / "model").eval()
    peft_model = peft.PeftModel.from_pretrained(torch_base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)  # fp32 on both sides; same bound as the LoRA export test


def test_sft_cli_gora_allocates_ranks_and_resumes_from_them(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    run_dir = sft_cli(llama_dir, tmp_path, "--method", "gora", "--gora-batches", "2") / "gora"
    ranks = jgoat.gora_ranks(run_dir / "checkpoints")
    assert ranks and all(2 <= int(r.min()) and int(r.max()) <= 16 for r in ranks.values())  # r_ref 4: [2, 16]
    first = json.loads((run_dir / "result.json").read_text())
    # --resume at the final step rebuilds the GoRA shapes from the checkpoint's ranks (no gradient pass) and
    # evaluates the restored adapters: the same eval loss, bit for bit.
    sft_cli(llama_dir, tmp_path, "--method", "gora", "--gora-batches", "2", "--resume")
    assert json.loads((run_dir / "result.json").read_text())["eval_loss"] == first["eval_loss"]
    model, params, _, ids = base_logits_and_ids(llama_dir)
    cfg = jgoat.GoraConfig(r_ref=4, r_min=2, r_max=16, alpha=8.0)
    final, _ = final_tree(run_dir, jgoat.gora_wrap(params, cfg, key=jax.random.key(0), ranks=ranks))
    ours = np.asarray(jgoat.apply(model.apply)({"params": final}, ids)[0].logits)
    torch_base = transformers.LlamaForCausalLM.from_pretrained(llama_dir / "model").eval()
    peft_model = peft.PeftModel.from_pretrained(torch_base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_sft_cli_lori_s_runs_lori_d_then_trains_under_its_mask(llama_dir, tmp_path):
    sft_cli(llama_dir, tmp_path, "--method", "lori_s", "--lori-sparsity", "0.5")
    _, params, _, _ = base_logits_and_ids(llama_dir)
    cfg = jgoat.LoriConfig(rank=4, alpha=8, sparsity=0.5)
    dense, _ = final_tree(tmp_path / "lori", jgoat.wrap(params, cfg, key=jax.random.key(0)))
    masks = jgoat.lori_masks(dense, 0.5)
    sparse, _ = final_tree(tmp_path / "lori_s", jgoat.lori_sparse(dense, masks))
    for path, mask in masks.items():
        node = _at(sparse, path)
        b = np.asarray(node["jgoat"].B)
        assert np.all(b[~np.asarray(mask)] == 0.0) and np.abs(b[np.asarray(mask)]).max() > 0
        np.testing.assert_array_equal(np.asarray(node["jgoat"].A), np.asarray(_at(dense, path)["jgoat"].A))
    lrs = {name: max(json.loads(line).get("lr", 0) for line in (tmp_path / name / "metrics.jsonl").open())
           for name in ("lori", "lori_s")}
    np.testing.assert_allclose(lrs["lori_s"], 10 * lrs["lori"], rtol=1e-6)  # the paper's 10x lr for LoRI-S


def _at(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("method, extra", [
    ("prompt", ("--virtual-tokens", "3", "--prompt-init", "text", "--prompt-init-text", "next after")),
    ("prefix", ("--virtual-tokens", "3", "--prefix-projection")),
    ("pfeiffer", ("--reduction-factor", "8")),
])
def test_sft_cli_graph_methods_train_only_their_leaves(llama_dir, tmp_path, method, extra):
    run_dir = sft_cli(llama_dir, tmp_path, "--method", method, *extra) / method
    from jgoat.models import load_tokenizer

    _, params, config, _ = base_logits_and_ids(llama_dir)
    key = jax.random.key(0)  # the CLI's key for --seed 0: the templates are the runs' exact initial states
    prompt = jgoat.PromptTuningConfig(3, init="text", init_text="next after")
    template = {"prompt": lambda: jgoat.add_prompt(params, prompt, key=key,
                                                   tokenizer=load_tokenizer(llama_dir / "model")),
                "prefix": lambda: jgoat.add_prefix(params, config, jgoat.PrefixTuningConfig(3, prefix_projection=True),
                                                   key=key),
                "pfeiffer": lambda: jgoat.add_bottleneck(params, config, jgoat.BottleneckConfig(8, "pfeiffer"),
                                                         key=key)}[method]()
    final, record = final_tree(run_dir, template)
    assert record["step"] == 4
    trained, frozen = jgoat.split(final)
    initial, base_frozen = jgoat.split(template)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial), strict=True):  # every trainable leaf moved
        assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(a) - np.asarray(b)).max() > 0
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base_frozen), strict=True):  # the base is untouched
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[-1]["eval/loss"])


def test_sft_cli_qlora_nf4_base_and_method_errors(llama_dir, tmp_path):
    run_dir = sft_cli(llama_dir, tmp_path / "q", "--method", "lora", "--quantize", "nf4") / "lora"
    _, params, _, _ = base_logits_and_ids(llama_dir)
    template = jgoat.wrap(jgoat.quantize_nf4(params), jgoat.LoraConfig(rank=4, alpha=8), key=jax.random.key(0))
    final, _ = final_tree(run_dir, template)
    kernels = [x for x in jax.tree.leaves(final, is_leaf=lambda v: isinstance(v, jgoat.NF4Kernel))
               if isinstance(x, jgoat.NF4Kernel)]
    assert len(kernels) == 7  # the 7 linears of the (scanned) decoder; lm_head stays full precision
    for method, extra, message in (("full", ("--quantize", "nf4"), "cannot be fully fine-tuned"),
                                   ("frozen", (), "has none"),
                                   ("ia3", ("--targets", "q_proj"), None)):
        if message is None:  # explicit targets without --feedforward: every target is scaled on its output
            sft_cli(llama_dir, tmp_path / method, "--method", method, *extra)
            continue
        with pytest.raises(ValueError, match=message):
            sft_cli(llama_dir, tmp_path / method, "--method", method, *extra, "--debug")


def test_image_cli_trains_head_and_goat_with_outputs(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("PIL")
    from PIL import Image

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
         "crop_size": {"height": 32, "width": 32}}))
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 200)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(rng.normal(level, 30, (40, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "image", "--model", str(tmp_path / "clip"), "--data",
                     str(tmp_path / "images"), "--out", str(out), "--method", "goat", "--rank", "8", "--experts",
                     "4", "--epochs", "2", "--batch-size", "8", "--test-size", "8", "--lr", "1e-2",
                     "--head-lr", "1e-2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["frozen", "goat"]
    for r in results:  # dark vs light is linearly separable: both reach full accuracy on the 8 held-out images
        assert r["test_accuracy"] == 1.0 and r["steps"] == 8
    rows = [json.loads(line) for line in (out / "goat" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [4, 8]
    assert (out / "goat" / "expert_load.png").stat().st_size > 0
    assert (out / "goat" / "adapter_goat" / "goat_config.json").is_file()
    assert tb_scalars(out / "goat" / "tensorboard")["eval/accuracy"][-1] == (8, 1.0)


def test_every_cli_method_builds_the_config_its_knobs_describe():
    def config(*argv, model_type=None):
        return cli.method_config(cli.build_parser().parse_args(["train", "--task", "sft", *argv]), model_type)

    knobs = ("--rank", "8", "--alpha", "16")
    assert config("--method", "kasa", *knobs, "--kasa-beta", "0.5", "--kasa-gamma", "0.25") == \
        jgoat.KasaConfig(rank=8, alpha=16.0, beta=0.5, gamma=0.25)
    assert config("--method", "gora", *knobs, "--gora-lr-init", "0.1", "--targets", "q_proj,v_proj") == \
        jgoat.GoraConfig(r_ref=8, r_min=4, r_max=32, alpha=16.0, lr_init=0.1, targets=("q_proj", "v_proj"))
    for method in ("lori", "lori_s"):
        assert config("--method", method, *knobs, "--lori-sparsity", "0.8") == \
            jgoat.LoriConfig(rank=8, alpha=16.0, sparsity=0.8)
    assert config("--method", "ia3", model_type="qwen2") == \
        jgoat.IA3Config(targets=("q_proj", "v_proj", "down_proj"), feedforward=("down_proj",))
    assert config("--method", "ia3", "--targets", "query,value,dense", "--feedforward", "dense") == \
        jgoat.IA3Config(targets=("query", "value", "dense"), feedforward=("dense",))
    with pytest.raises(ValueError, match="no default targets for model type 'vit'"):
        config("--method", "ia3", model_type="vit")
    assert config("--method", "prompt", "--virtual-tokens", "7", "--prompt-init", "sample_vocab") == \
        jgoat.PromptTuningConfig(7, init="sample_vocab")
    assert config("--method", "prefix", "--virtual-tokens", "5", "--prefix-projection") == \
        jgoat.PrefixTuningConfig(5, prefix_projection=True)
    assert config("--method", "pfeiffer", "--reduction-factor", "4") == jgoat.BottleneckConfig(4, "pfeiffer")
    assert config("--method", "houlsby") == jgoat.BottleneckConfig(16, "houlsby")
    assert config("--method", "dora", *knobs) == jgoat.LoraConfig(rank=8, alpha=16.0, use_dora=True)
    assert config("--method", "full") is None and config("--method", "frozen") is None


def test_dtype_auto_is_bfloat16_on_accelerators_only(monkeypatch):
    import jax.numpy as jnp

    assert cli.build_parser().parse_args(["train"]).dtype == "auto"
    assert cli.compute_dtype("auto") == jnp.float32  # the tests run on CPU
    for backend, want in (("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert cli.compute_dtype("auto") == want
        assert cli.compute_dtype("float32") == jnp.float32 and cli.compute_dtype("bfloat16") == jnp.bfloat16


def test_shipped_configs_parse_with_the_published_settings():
    parser = cli.build_parser()
    root = pathlib.Path(__file__).parent.parent / "configs"
    parsed = {f.stem: parser.parse_args(["train", "--config", str(f)]) for f in root.glob("*.json")}
    assert sorted(parsed) == ["commonsense_llama2_7b", "glue_roberta_large", "image_clip_vit_b32", "math_llama2_7b"]
    published = {  # GOAT.md §6: task, r, alpha, lr, batch, eta, rho
        "glue_roberta_large": ("classify", 32, 64, 1e-4, 256, 1.0, 10.0),
        "image_clip_vit_b32": ("image", 8, 16, 1e-4, 512, 1.0, 10.0),
        "commonsense_llama2_7b": ("sft", 32, 64, 1e-4, 16, 0.1, 20.0),
        "math_llama2_7b": ("sft", 8, 16, 2e-5, 32, 1.0, 10.0),
    }
    for name, a in parsed.items():
        assert (a.task, a.rank, a.alpha, a.lr, a.batch_size, a.eta, a.rho) == published[name], name
        assert (a.experts, a.top_k, a.warmup_ratio, a.clip_norm, a.dtype) == (8, 2, 0.03, 1.0, "bfloat16"), name
    assert parsed["commonsense_llama2_7b"].targets == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def test_packaged_model_names_resolve(tmp_path, monkeypatch):
    from jgoat.models import minilm_path

    assert cli.resolve_model("minilm") == str(minilm_path())
    assert cli.resolve_model(str(tmp_path)) == str(tmp_path) and cli.resolve_model(None) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()  # a real folder of that name wins over the package
    assert cli.resolve_model("minilm") == "minilm"
