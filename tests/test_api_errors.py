"""The Python API's bad-input catalogue (issue 10): adapter knobs, `jgoat.wrap`, checkpoints, adapter files and model
configs. Every case asserts the exception type, a one-line message naming the culprit (field, module, file + key)
and that nothing was written or changed: the files under the case's folder (names, sizes, bytes) and the base
params tree are exactly what they were before the call. Positive checks: what the refusals must not break."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import chex
import jax
import numpy as np
import pytest

import jgoat
from jgoat import core
from jgoat.checkpoint import read_adapters
from jgoat.errors import JgoatError
from jgoat.interop import export_goat, export_peft, import_goat, import_peft
from jgoat.models import formats
from jgoat.tasks import torch_module_name

NAN, INF = float("nan"), float("inf")
GOAT_CFG = jgoat.GoatConfig(rank=4, experts=2, top_k=1, targets=["dense"], modules_to_save=["classifier"])
LORA_CFG = jgoat.LoraConfig(rank=2, alpha=4.0, targets=["dense"], modules_to_save=["classifier"])


def base_params() -> dict:
    """Hand-built numpy params (no model to compile): two Dense layers, a conv kernel and a classifier head."""
    rng = np.random.default_rng(0)

    def dense(n, m):
        return {"kernel": rng.standard_normal((n, m)).astype(np.float32),
                "bias": (0.1 * rng.standard_normal(m)).astype(np.float32)}

    return {"encoder": {"layer_0": {"dense": dense(16, 12)}, "layer_1": {"dense": dense(12, 8)}},
            "patch": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
            "classifier": dense(8, 3)}


def trained(tree: dict) -> dict:
    """`tree` after some 'training': every adapter leaf and the modules_to_save head moved away from its init."""
    saved = core.saved_prefixes(tree)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    moved = [x + np.float32(0.01 * (i + 1))
             if core.is_adapter_path(jax.tree_util.keystr(p, simple=True, separator="/"), saved) else x
             for i, (p, x) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, moved)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A CLI-style GOAT classify export and a PEFT export with HF torch names (as `jgoat train` writes them)."""
    root = tmp_path_factory.mktemp("exports")
    goat = trained(jgoat.wrap(base_params(), GOAT_CFG, key=jax.random.key(0)))
    export_goat(goat, GOAT_CFG, root / "goat", fingerprint=jgoat.fingerprint(goat))  # what the CLI passes
    lora = trained(jgoat.wrap(base_params(), LORA_CFG, key=jax.random.key(1)))
    export_peft(lora, LORA_CFG, root / "peft", torch_name=torch_module_name)
    return {"root": root, "goat": goat, "lora": lora}


# ----------------------------------------------------------------------------------------------------------- harness


@dataclasses.dataclass
class Env:
    """What a case may use: its own folder (copies of the exports), the base params it must leave untouched."""

    path: Any
    params: dict
    goat: Any = None  # the trained GOAT tree of the export
    lora: Any = None  # the trained LoRA tree of the export

    def edit_json(self, rel: str, fn: Callable[[dict], None]) -> None:
        file = self.path / rel
        doc = json.loads(file.read_text())
        fn(doc)
        file.write_text(json.dumps(doc))  # json writes NaN / Infinity literals, as a crafted file would hold


def snapshot(folder) -> dict[str, bytes | None]:
    """Every file (with its bytes) and every directory (None) under `folder`."""
    out: dict[str, bytes | None] = {}
    for d, subs, files in os.walk(folder):
        out.update({os.path.relpath(os.path.join(d, s), folder): None for s in subs})
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


def nan_at(params: dict, path: tuple[str, ...], value: float = NAN) -> dict:
    kernel = core.get_at(params, path)["kernel"].copy()
    kernel.flat[kernel.size // 2] = value
    return core.replace_at(params, path, lambda m: {**m, "kernel": kernel})


def goat_meta(fn):
    return lambda env: env.edit_json("goat/goat_config.json", fn)


def peft_meta(fn):
    return lambda env: env.edit_json("peft/adapter_config.json", fn)


def wrap_case(cfg_fn, **kw):
    return lambda env: jgoat.wrap(env.params, cfg_fn(), key=jax.random.key(0), **kw)


# each case: (setup(env) -> None, the call(env), exception type, regex the one-line message must match)
CASES = {
    # ---- adapter knobs: one check by declared type for every config
    "goat-alpha-nan": (None, lambda env: jgoat.GoatConfig(alpha=NAN), JgoatError,
                       r"^GoatConfig\.alpha must be a finite number, got nan$"),
    "goat-eta-inf": (None, lambda env: jgoat.GoatConfig(eta=INF), JgoatError, r"GoatConfig\.eta .* got inf$"),
    "goat-rho-neg-inf": (None, lambda env: jgoat.GoatConfig(rho=-INF), JgoatError, r"GoatConfig\.rho .* got -inf$"),
    "goat-rho-str": (None, lambda env: jgoat.GoatConfig(rho="10"), JgoatError,
                     r"GoatConfig\.rho must be a finite number, got '10'"),
    "goat-rank-bool": (None, lambda env: jgoat.GoatConfig(rank=True), JgoatError,
                       r"GoatConfig\.rank must be a positive integer, got True"),
    "goat-experts-bool": (None, lambda env: jgoat.GoatConfig(rank=2, experts=True, top_k=1), JgoatError,
                          r"GoatConfig\.experts must be a positive integer, got True"),
    "goat-topk-float": (None, lambda env: jgoat.GoatConfig(top_k=2.0), JgoatError,
                        r"GoatConfig\.top_k must be a positive integer, got 2\.0"),
    "goat-topk-above-experts": (None, lambda env: jgoat.GoatConfig(rank=8, experts=4, top_k=5), ValueError,
                                r"top_k 5 > experts 4"),
    "goat-init-cof-nan": (None, lambda env: jgoat.GoatConfig(init_cof=NAN), JgoatError,
                          r"GoatConfig\.init_cof must be a finite number, got nan"),
    "goat-dropout-nan": (None, lambda env: jgoat.GoatConfig(dropout=NAN), JgoatError,
                         r"GoatConfig\.dropout must be a finite number, got nan"),
    "molora-alpha-inf": (None, lambda env: jgoat.MoLoraConfig(alpha=INF), JgoatError, r"MoLoraConfig\.alpha"),
    "lora-alpha-inf": (None, lambda env: jgoat.LoraConfig(alpha=INF), JgoatError, r"LoraConfig\.alpha .* got inf"),
    "lora-rank-bool": (None, lambda env: jgoat.LoraConfig(rank=True), JgoatError, r"LoraConfig\.rank .* got True"),
    "lora-rslora-int": (None, lambda env: jgoat.LoraConfig(use_rslora=1), JgoatError,
                        r"LoraConfig\.use_rslora must be True or False, got 1"),
    "kasa-gamma-nan": (None, lambda env: jgoat.KasaConfig(gamma=NAN), JgoatError, r"KasaConfig\.gamma .* got nan"),
    "lori-sparsity-nan": (None, lambda env: jgoat.LoriConfig(sparsity=NAN), JgoatError,
                          r"LoriConfig\.sparsity .* got nan"),
    "gora-lr-inf": (None, lambda env: jgoat.GoraConfig(lr_init=INF), JgoatError, r"GoraConfig\.lr_init .* got inf"),
    "gora-rmax-bool": (None, lambda env: jgoat.GoraConfig(r_max=True), JgoatError, r"GoraConfig\.r_max .* True"),
    "bottleneck-factor-bool": (None, lambda env: jgoat.BottleneckConfig(reduction_factor=True), JgoatError,
                               r"BottleneckConfig\.reduction_factor .* got True"),
    "prompt-tokens-bool": (None, lambda env: jgoat.PromptTuningConfig(num_virtual_tokens=True), JgoatError,
                           r"PromptTuningConfig\.num_virtual_tokens .* got True"),
    "prefix-hidden-0": (None, lambda env: jgoat.PrefixTuningConfig(4, prefix_projection=True, encoder_hidden_size=0),
                        JgoatError, r"PrefixTuningConfig\.encoder_hidden_size must be a positive integer, got 0"),
    "targets-bad-regex": (None, lambda env: jgoat.LoraConfig(targets="(dense"), JgoatError,
                          r"^targets='\(dense' is not a valid regular expression: missing \)"),
    "exclude-bad-regex": (None, lambda env: jgoat.GoatConfig(exclude="[a"), JgoatError,
                          r"^exclude='\[a' is not a valid regular expression"),
    "ia3-feedforward-bad-regex": (None, lambda env: jgoat.IA3Config(targets=".*", feedforward="*x"), JgoatError,
                                  r"^feedforward='\*x' is not a valid regular expression"),
    "targets-not-str": (None, lambda env: jgoat.LoraConfig(targets=5), JgoatError,
                        r"targets must be a regex string or a sequence of module names, got 5"),
    # ---- jgoat.wrap
    "wrap-conv-kernel": (None, wrap_case(lambda: jgoat.LoraConfig(rank=2, targets=["patch"])), JgoatError,
                         r"target 'patch' holds a 4-D kernel \(3, 3, 2, 4\), a convolution's layout"),
    "wrap-conv-not-probed": (None, wrap_case(lambda: jgoat.LoraConfig(rank=2, targets=["patch", "dense"]),
                                             layouts={"encoder/layer_0/dense": core.Layout(),
                                                      "encoder/layer_1/dense": core.Layout()}),
                             JgoatError, r"target 'patch' \(kernel \(3, 3, 2, 4\)\) is not a linear module"),
    "wrap-twice-unnamed": (None, lambda env: jgoat.wrap(jgoat.wrap(env.params, LORA_CFG, key=jax.random.key(0)),
                                                        jgoat.LoraConfig(rank=2), key=jax.random.key(1)),
                           JgoatError, r"params are already wrapped: 'encoder/layer_0/dense' holds an adapter"),
    "wrap-same-name-twice": (None, lambda env: jgoat.wrap(
        jgoat.wrap(env.params, jgoat.LoraConfig(rank=2), key=jax.random.key(0), name="a"),
        jgoat.LoraConfig(rank=2), key=jax.random.key(1), name="a"), ValueError, r"an adapter named 'a' already exists"),
    "wrap-targets-match-nothing": (None, wrap_case(lambda: jgoat.LoraConfig(targets=["query"])), ValueError,
                                   r"targets rule 'query' matches no linear module; some real module paths"),
    "wrap-nan-base-goat": (lambda env: setattr(env, "params", nan_at(env.params, ("encoder", "layer_1", "dense"))),
                           wrap_case(lambda: GOAT_CFG), JgoatError,
                           r"base weight 'encoder/layer_1/dense/kernel' holds NaN or inf values: GoatConfig"),
    "wrap-inf-base-pissa": (lambda env: setattr(env, "params", nan_at(env.params, ("encoder", "layer_0", "dense"),
                                                                      INF)),
                            wrap_case(lambda: jgoat.LoraConfig(rank=2, init="pissa")), JgoatError,
                            r"base weight 'encoder/layer_0/dense/kernel' holds NaN or inf values: LoraConfig"),
    "wrap-nan-base-kasa": (lambda env: setattr(env, "params", nan_at(env.params, ("encoder", "layer_0", "dense"))),
                           wrap_case(lambda: jgoat.KasaConfig(rank=2)), JgoatError,
                           r"base weight 'encoder/layer_0/dense/kernel' .* KasaConfig"),
    "mark-trainable-bad-regex": (None, lambda env: jgoat.mark_trainable(env.params, "[x"), JgoatError,
                                 r"^modules_to_save='\[x' is not a valid regular expression"),
    # ---- checkpoints
    "restore-missing-dir": (None, lambda env: jgoat.restore(env.path / "ckpt", env.lora), FileNotFoundError,
                            r"checkpoint directory '.*ckpt' does not exist"),
    "read-adapters-missing-dir": (None, lambda env: read_adapters(env.path / "ckpt"),
                                  FileNotFoundError, r"checkpoint directory '.*ckpt' does not exist"),
    "save-bad-metadata": (None, lambda env: jgoat.save(env.path / "ckpt", env.lora, step=1,
                                                       metadata={"lr": 1e-3, "tx": object()}),
                          JgoatError, r"metadata\['tx'\] is not JSON-serialisable .* nothing was saved"),
    "save-step-bool": (None, lambda env: jgoat.save(env.path / "ckpt", env.lora, step=True), JgoatError,
                       r"step must be an integer >= 0, got True"),
    "save-step-negative": (None, lambda env: jgoat.save(env.path / "ckpt", env.lora, step=-1), JgoatError,
                           r"step must be an integer >= 0, got -1"),
    # ---- GOAT adapter files
    "goat-wrong-fingerprint-arg": (None, lambda env: import_goat(env.params, env.path / "goat", fingerprint="sha256:x"),
                                   JgoatError, r"fingerprint='sha256:x' is not the fingerprint of these params"),
    "goat-copied-fingerprint-other-base": (
        lambda env: setattr(env, "params", nan_at(env.params, ("encoder", "layer_1", "dense"), 7.0)),
        lambda env: import_goat(env.params, env.path / "goat", fingerprint=json.loads(
            (env.path / "goat/goat_config.json").read_text())["base_fingerprint"]),
        JgoatError, r"is not the fingerprint of these params"),
    "goat-other-base": (lambda env: setattr(env, "params", nan_at(env.params, ("encoder", "layer_1", "dense"), 7.0)),
                        lambda env: import_goat(env.params, env.path / "goat"), ValueError,
                        r"base fingerprint mismatch: the GOAT adapter in .*goat was trained on a base"),
    "goat-scale-nan": (goat_meta(lambda m: m["modules"][0].update(scale=NAN)),
                       lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                       r"goat_config\.json: modules\[0\]\.scale must be a finite number > 0, got nan"),
    "goat-scale-str": (goat_meta(lambda m: m["modules"][1].update(scale="2.0")),
                       lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                       r"goat_config\.json: modules\[1\]\.scale must be a finite number > 0, got '2\.0'"),
    "goat-config-alpha-nan": (goat_meta(lambda m: m["config"].update(alpha=NAN)),
                              lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                              r"goat_config\.json: config: GoatConfig\.alpha must be a finite number, got nan"),
    "goat-config-unknown-knob": (goat_meta(lambda m: m["config"].update(gamma=1)),
                                 lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                                 r"goat_config\.json: config: .*unexpected keyword argument 'gamma'"),
    "goat-config-class": (goat_meta(lambda m: m.update(config_class="os.system")),
                          lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                          r"goat_config\.json: config_class must be one of .*got 'os\.system'"),
    "goat-in-features-bool": (goat_meta(lambda m: m["modules"][0].update(in_features=True)),
                              lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                              r"goat_config\.json: modules\[0\]\.in_features must be an integer > 0, got True"),
    "goat-not-json": (lambda env: (env.path / "goat/goat_config.json").write_text("{"),
                      lambda env: import_goat(env.params, env.path / "goat"), JgoatError,
                      r"goat_config\.json: not valid JSON"),
    "goat-export-wrong-fingerprint": (None, lambda env: export_goat(env.goat, GOAT_CFG, env.path / "new",
                                                                    fingerprint="fp"),
                                      JgoatError, r"fingerprint='fp' is not this tree's base fingerprint"),
    # ---- PEFT adapter files
    "peft-alpha-nan": (peft_meta(lambda c: c.update(lora_alpha=NAN)),
                       lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
                       r"adapter_config\.json: lora_alpha must be a finite number, got nan"),
    "peft-alpha-str": (peft_meta(lambda c: c.update(lora_alpha="16")),
                       lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
                       r"adapter_config\.json: lora_alpha must be a finite number, got '16'"),
    "peft-r-bool": (peft_meta(lambda c: c.update(r=True)), lambda env: import_peft(env.params, env.path / "peft"),
                    JgoatError, r"adapter_config\.json: r must be an integer > 0, got True"),
    "peft-alpha-pattern-inf": (peft_meta(lambda c: c.update(alpha_pattern={"^encoder": INF})),
                               lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
                               r"adapter_config\.json: alpha_pattern\['\^encoder'\] must be a finite number"),
    "peft-dropout-1.5": (peft_meta(lambda c: c.update(lora_dropout=1.5)),
                         lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
                         r"adapter_config\.json: lora_dropout must be in \[0, 1\), got 1\.5"),
    "peft-rslora-str": (peft_meta(lambda c: c.update(use_rslora="yes")),
                        lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
                        r"adapter_config\.json: use_rslora must be true or false, got 'yes'"),
    "peft-names-bad-index": (lambda env: env.edit_json(
        "peft/jgoat_torch_names.json", lambda d: d["names"]["encoder.layer.0.dense"].update(index=[-1])),
        lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
        r"jgoat_torch_names\.json: names\['encoder\.layer\.0\.dense'\]\.index\[0\] must be an integer >= 0"),
    "peft-config-not-object": (lambda env: (env.path / "peft/adapter_config.json").write_text("[1]"),
                               lambda env: import_peft(env.params, env.path / "peft"), JgoatError,
                               r"adapter_config\.json: not a peft adapter config"),
}


@pytest.fixture
def env(tmp_path, exports) -> Env:
    for name in ("goat", "peft"):
        shutil.copytree(exports["root"] / name, tmp_path / name)
    return Env(path=tmp_path, params=base_params(), goat=exports["goat"], lora=exports["lora"])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_api_input_is_refused_in_one_line_and_changes_nothing(name, env):
    setup, call, exc, pattern = CASES[name]
    if setup is not None:
        setup(env)
    files, params = snapshot(env.path), jax.tree.map(np.copy, env.params)
    with pytest.raises(exc) as err:
        call(env)
    message = str(err.value)
    assert "\n" not in message and re.search(pattern, message), message
    assert snapshot(env.path) == files  # nothing written, created or replaced (no directory either)
    chex.assert_trees_all_equal(env.params, params)  # the base is untouched


def test_catalogue_size():
    assert len(CASES) >= 30


# ----------------------------------------------------------------------------------------------------------- models


def tiny_decoder_folder(folder, layers_in_config: int):
    tensors = [("model.embed_tokens.weight", (10, 8))]
    tensors += [(f"model.layers.{i}.self_attn.q_proj.weight", (8, 8)) for i in range(2)]
    formats.write_safetensors(folder / "model.safetensors",
                              [(k, s, np.float32, lambda s=s: np.zeros(s, np.float32)) for k, s in tensors])
    config = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": layers_in_config,
              "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10}
    (folder / "config.json").write_text(json.dumps(config))


def tiny_vit_folder(folder, layers_in_config: int):
    tensors = [("vit.embeddings.patch_embeddings.projection.weight", (8, 3, 4, 4))]
    tensors += [(f"vit.encoder.layer.{i}.attention.attention.query.weight", (8, 8)) for i in range(2)]
    formats.write_safetensors(folder / "model.safetensors",
                              [(k, s, np.float32, lambda s=s: np.zeros(s, np.float32)) for k, s in tensors])
    config = {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": layers_in_config, "num_attention_heads": 2,
              "intermediate_size": 16, "image_size": 8, "patch_size": 4, "num_channels": 3}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("make", [tiny_decoder_folder, tiny_vit_folder], ids=["llama", "vit"])
def test_from_pretrained_refuses_a_config_claiming_100000_layers_before_building(make, tmp_path):
    make(tmp_path, 100_000)
    files = snapshot(tmp_path)
    start = time.perf_counter()
    with pytest.raises(formats.CheckpointFormatError) as err:
        jgoat.models.from_pretrained(tmp_path)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert "\n" not in message and re.search(r"config\.json: num_hidden_layers is 100000 but the checkpoint", message)
    # building 100,000 layers takes minutes; the check reads key names only (a generous bound for a loaded CI box)
    assert elapsed < 5.0, elapsed
    assert snapshot(tmp_path) == files


# ----------------------------------------------------------------------------------------------------------- positive


def test_import_goat_round_trips_a_cli_classify_export_with_its_head(exports):
    """The CLI's GOAT classify export (head in modules_to_save, fingerprint=jgoat.fingerprint(tree)) imports onto the
    untouched base: the head is the file's, and the tree equals the trained one leaf for leaf."""
    tree, cfg = import_goat(base_params(), exports["root"] / "goat")
    assert cfg == GOAT_CFG
    chex.assert_trees_all_equal(tree, exports["goat"])
    assert not np.array_equal(tree["classifier"]["kernel"], base_params()["classifier"]["kernel"])
    assert isinstance(tree["classifier"][core.ADAPTER_KEY], core.TrainModule)
    tree_again, _ = import_goat(jgoat.wrap(base_params(), GOAT_CFG, key=jax.random.key(5)), exports["root"] / "goat",
                                fingerprint=jgoat.fingerprint(exports["goat"]))  # the old argument, verified
    chex.assert_trees_all_equal(tree_again, exports["goat"])


def test_import_peft_reads_an_hf_named_export_without_being_told_the_mapping(exports, tmp_path):
    folder = exports["root"] / "peft"
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == [
        "encoder.layer.0.dense", "encoder.layer.1.dense"]
    chex.assert_trees_all_equal(import_peft(base_params(), folder), exports["lora"])
    shutil.copytree(folder, tmp_path / "peft")
    os.remove(tmp_path / "peft" / "jgoat_torch_names.json")  # a folder without the record: default names miss
    with pytest.raises(ValueError, match=r"unknown key 'base_model\.model\.encoder\.layer\.0\.dense\.lora_A\.weight'"):
        import_peft(base_params(), tmp_path / "peft")
    chex.assert_trees_all_equal(import_peft(base_params(), tmp_path / "peft", torch_name=torch_module_name),
                                exports["lora"])


def test_valid_knobs_still_construct_and_numpy_scalars_become_python_numbers():
    cfg = jgoat.GoatConfig(rank=np.int64(8), experts=4, top_k=2, alpha=np.float32(16), init_cof=0.0, eta=1)
    assert type(cfg.rank) is int and type(cfg.alpha) is float and cfg.alpha == 16.0 and cfg.eta == 1
    assert hash(cfg) == hash(jgoat.GoatConfig(rank=8, experts=4, top_k=2, alpha=16.0, init_cof=0.0, eta=1))
    jgoat.LoraConfig(rank=4, alpha=8, targets=r".*/(query|value)", exclude=["classifier"], dropout=0.1)
    jgoat.IA3Config(targets=["key", "value", "output/dense"], feedforward=["output/dense"])
    jgoat.PrefixTuningConfig(4, prefix_projection=True, encoder_hidden_size=16)
    assert math.isclose(jgoat.KasaConfig(rank=2, beta=0, gamma=0).beta, 0.0)


def test_disjoint_unnamed_wraps_and_second_named_adapter_stay_legal():
    tree = jgoat.wrap(base_params(), jgoat.LoraConfig(rank=4, targets=["layer_0/dense"]), key=jax.random.key(0))
    tree = jgoat.wrap(tree, jgoat.LoraConfig(rank=2, targets=["layer_1/dense"]), key=jax.random.key(1))
    assert [p for p, _ in jgoat.adapters(tree)] == ["encoder/layer_0/dense", "encoder/layer_1/dense"]
    named = jgoat.wrap(base_params(), jgoat.LoraConfig(rank=2), key=jax.random.key(0), name="a")
    named = jgoat.wrap(named, jgoat.GoatConfig(rank=4, experts=2, top_k=1), key=jax.random.key(1), name="b")
    assert jgoat.adapter_names(named) == ("a", "b")


def test_finite_base_passes_and_inits_that_never_read_the_base_skip_the_check():
    params = base_params()
    tree = jgoat.wrap(params, GOAT_CFG, key=jax.random.key(0))  # finite: accepted
    assert [p for p, _ in jgoat.adapters(tree)] == ["encoder/layer_0/dense", "encoder/layer_1/dense"]
    # inits that never read the base skip the check: a NaN base gets kaiming LoRA (training would then say so)
    jgoat.wrap(nan_at(params, ("encoder", "layer_0", "dense")), jgoat.LoraConfig(rank=2), key=jax.random.key(0))


DAMAGED_RESTORE = r"""
import pathlib, sys, time, jax, jax.numpy as jnp, numpy as np, jgoat
base = {f"layer_{i}": {"dense": {"kernel": np.full((16, 16), 0.01 * (i + 1), np.float32)}} for i in range(40)}
tree = jgoat.wrap(base, jgoat.GoatConfig(rank=4, experts=4, top_k=2, targets=["dense"]), key=jax.random.key(1))
d = pathlib.Path(sys.argv[1])
jgoat.save(d, tree, step=1)
jgoat.save(d, tree, step=2)
data = max((d / "2" / "adapter" / "d").iterdir(), key=lambda p: p.stat().st_size)
raw = bytearray(data.read_bytes())
raw[len(raw) // 2] ^= 0xFF
data.write_bytes(bytes(raw))
try:
    jgoat.restore(d, tree)
except jgoat.JgoatError as err:
    print("REFUSED", err)
time.sleep(1.0)  # late completions of reads still in flight would print here
restored, _, record = jgoat.restore(d, tree, step=1)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)))
print("STEP", record["step"], same)
"""


def test_a_damaged_checkpoint_is_refused_in_one_line_with_no_tracebacks_from_reads_in_flight(tmp_path):
    """A flipped byte in the newest step's data: one JgoatError naming the step, nothing printed to stderr (orbax's
    own reader used to fail while other reads were in flight; their completions printed ~1,000 lines of "Event loop
    is closed" tracebacks in most runs), and the older step still restores exactly."""
    done = subprocess.run([sys.executable, "-c", DAMAGED_RESTORE, str(tmp_path / "ck")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    refused = [line for line in done.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 1 and f"checkpoint {tmp_path / 'ck' / '2'} is damaged" in refused[0]
    assert "CRC-32C checksum" in refused[0]
    assert "STEP 1 True" in done.stdout
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr[:2000]
