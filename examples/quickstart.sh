#!/usr/bin/env bash
# The shipped example end to end: build a tiny base and two diffs, inspect them, bake base +
# language diff + task diff into one checkpoint, and run it with transformers. Re-runnable.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1
OUT="${EXAMPLE_OUT:-out}"  # where everything goes (tests point it elsewhere)

python make_example.py --out "$OUT"
sftdiff inspect "$OUT/lang.sft"
sftdiff inspect "$OUT/task.sft"
# The language diff carries its MLM head as dense entries; a tagger does not need it.
sftdiff apply "$OUT/base" "$OUT/lang.sft" "$OUT/task.sft" --skip-dense "$OUT/lang.sft" -o "$OUT/merged" --force
# The baked folder records what it was made from (also in its README.md model card).
sftdiff inspect "$OUT/merged"

python - "$OUT/merged" <<'PY'
import sys

import torch
import transformers
from transformers import AutoModelForTokenClassification, AutoTokenizer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForTokenClassification.from_pretrained(folder).eval()
sentence = "anna visited the old city of lisbon in spring"
enc = tokenizer(sentence, return_tensors="pt")
with torch.no_grad():
    tags = model(**enc).logits.argmax(-1)[0]
words = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
print(f"{type(model).__name__} from {folder}:")
print(" ".join(f"{w}/{model.config.id2label[int(t)]}" for w, t in zip(words, tags) if w not in ("[CLS]", "[SEP]")))
PY
