"""load_tokenizer: the folder's tokenizer, with its chat template when the folder has one."""

import json
import shutil

import pytest

from jgoat.models import load_tokenizer, minilm_path

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"


@pytest.fixture
def tokenizer_dir(tmp_path):
    try:
        src = minilm_path()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(str(err))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


def test_tokenizer_round_trip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids = tok("self driving cars")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "self driving cars"


def test_chat_template_when_present(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    tok = load_tokenizer(tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<user>hi</user><assistant>hello</assistant>"
