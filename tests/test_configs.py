"""Every config in configs/ runs end to end (`jgoat train --config ...`, 2 optimizer steps) on tiny stand-ins of the
layouts it expects (configs/README.md): a tiny random checkpoint folder of its family with a tokenizer or
preprocessor, and data files in its format.

Two variants: the default suite overrides the sizes (batch 8 in 2 micro-batches, short sequences, 8 held-out
examples) so that it runs in seconds; the slow one (``-m slow``) keeps every shipped setting (batch 256/512/16/32,
grad_accum 4, max_length, test_size 500, bf16) and overrides only the paths. The configs set ``epochs``, which
takes precedence over ``--steps``, so each stand-in holds exactly one batch of training examples and the run asks
for ``--epochs 2``."""

import json
import math
import pathlib

import numpy as np
import pytest

from jgoat import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
WORDS = ["<s>", "<pad>", "</s>", "<unk>", "the", "a", "movie", "is", "good", "bad", "what", "answer", "two", "plus",
         "four", "yes", "no", "question", "because"]


def word_tokenizer(folder: pathlib.Path, **specials) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                         **specials).save_pretrained(folder)


def sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS[4:], n))


# Model sizes: every targeted linear is at least the config's rank wide (GOAT needs r <= min(in, out)): r 32 for
# GLUE and commonsense (Llama k/v_proj: 2 KV heads x head_dim 16 = 32), r 8 for image and math.


def glue_layout(root: pathlib.Path, n_train: int, n_eval: int) -> dict[str, str]:
    """models/roberta-large (tiny) + data/glue/sst2/{train,validation}.parquet with `sentence` and int `label`."""
    model = root / "roberta"
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=130,
                                        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    transformers.RobertaForSequenceClassification(config).save_pretrained(model)
    word_tokenizer(model, bos_token="<s>", eos_token="</s>")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = [{"sentence": sentence(rng, 3 + i % 5), "label": i % 2, "idx": i} for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(root / f"{split}.parquet")
    return {"model": str(model), "data": str(root / "train.parquet"), "eval_data": str(root / "validation.parquet")}


def image_layout(root: pathlib.Path, n_train: int, n_eval: int) -> dict[str, str]:
    """models/clip-vit-base-patch32 (a tiny CLIPModel folder) + data/images/{train,test}/<class>/*.png."""
    from PIL import Image

    model = root / "clip"
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(model)
    (model / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
         "crop_size": {"height": 32, "width": 32}, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}))
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_eval)):
        for label, level in (("cat", 60), ("dog", 190)):
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n // 2):
                pixels = np.clip(rng.normal(level, 30, (36, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return {"model": str(model), "data": str(root / "images" / "train"), "eval_data": str(root / "images" / "test")}


def llama(root: pathlib.Path) -> pathlib.Path:
    model = root / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    word_tokenizer(model, bos_token="<s>", eos_token="</s>")  # a base model: no chat template
    return model


def commonsense_layout(root: pathlib.Path, n_train: int, n_eval: int, max_length: int) -> dict[str, str]:
    """models/Llama-2-7b-hf (tiny) + LLM-Adapters' commonsense_170k.json: a JSON list of {instruction, input, output,
    answer} (test_size examples of it are held out)."""
    rng = np.random.default_rng(0)
    # over half of max_length tokens each (one word = one token, plus the template): SFT packing keeps one example
    # per row, so the `batch` examples are one batch
    rows = [{"instruction": f"question {sentence(rng, max_length // 2)} answer", "input": "",
             "output": f"the answer is {a}",
             "answer": a} for a in rng.choice(["yes", "no"], n_train + n_eval)]
    (root / "commonsense_170k.json").write_text(json.dumps(rows, indent=1))
    return {"model": str(llama(root)), "data": str(root / "commonsense_170k.json")}


def math_layout(root: pathlib.Path, n_train: int, n_eval: int, max_length: int) -> dict[str, str]:
    """models/Llama-2-7b-hf (tiny) + a MetaMathQA-style JSON list of {query, response}."""
    rng = np.random.default_rng(1)
    rows = [{"query": f"what is {sentence(rng, max_length // 2 - 4)}",
             "response": f"two plus two is four because {sentence(rng, 4)}",
             "type": "GSM_Rephrased"} for _ in range(n_train + n_eval)]
    (root / "train.json").write_text(json.dumps(rows))
    return {"model": str(llama(root)), "data": str(root / "train.json")}


PACKED = ("commonsense_llama2_7b", "math_llama2_7b")  # SFT: their stand-ins size examples by --max-length
LAYOUTS = {"glue_roberta_large": glue_layout, "image_clip_vit_b32": image_layout,
           "commonsense_llama2_7b": commonsense_layout, "math_llama2_7b": math_layout}


def test_every_shipped_config_has_a_stand_in():
    assert sorted(f.stem for f in CONFIGS.glob("*.json")) == sorted(LAYOUTS)


FAST = ("--batch-size", "8", "--grad-accum", "2", "--eval-batch-size", "8")
FAST_SIZES = {"glue_roberta_large": ("--max-length", "24"), "image_clip_vit_b32": (),
              "commonsense_llama2_7b": ("--max-length", "32", "--test-size", "8"),
              "math_llama2_7b": ("--max-length", "32", "--test-size", "8")}


def run_config(name: str, root: pathlib.Path, overrides: tuple[str, ...], n_eval: int) -> None:
    """`jgoat train --config configs/<name>.json` with the paths of the stand-ins, for --epochs 2 of one batch."""
    shipped = json.loads((CONFIGS / f"{name}.json").read_text())
    batch = int(overrides[overrides.index("--batch-size") + 1]) if overrides else shipped["batch_size"]
    flags = dict(zip(overrides[::2], overrides[1::2], strict=False))
    max_length = int(flags.get("--max-length", shipped.get("max_length", 32)))
    paths = LAYOUTS[name](root, batch, n_eval, *([max_length] if name in PACKED else []))
    assert ("eval_data" in paths) == ("eval_data" in shipped)  # the stand-in has the files the config names
    out = root / "run"
    argv = ["train", "--config", str(CONFIGS / f"{name}.json"), "--model", paths["model"], "--data", paths["data"],
            *(["--eval-data", paths["eval_data"]] if "eval_data" in paths else []), "--epochs", "2", "--out",
            str(out), *overrides]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / shipped["method"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "task_loss" in r] == [1, 2]
    assert all(math.isfinite(r["task_loss"]) for r in rows if "task_loss" in r)
    final = next(r for r in json.loads((out / "results.json").read_text()) if r["method"] == shipped["method"])
    assert final["steps"] == 2 and math.isfinite(final["eval"]["loss"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_config_runs_two_steps_on_tiny_stand_ins(name, tmp_path):
    run_config(name, tmp_path, (*FAST, *FAST_SIZES[name]), n_eval=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_config_runs_two_steps_with_its_shipped_sizes(name, tmp_path):
    test_size = json.loads((CONFIGS / f"{name}.json").read_text()).get("test_size", 8)
    run_config(name, tmp_path, (), n_eval=test_size)
