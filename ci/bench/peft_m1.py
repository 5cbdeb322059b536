#!/usr/bin/env python3
# Pinned reference stack (ci/peft/requirements.txt):
#   torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0
#   accelerate==1.15.0 numpy==2.4.6
"""Benchmark M1 (issue 9), the PEFT + transformers + PyTorch side.

The same work as ci/bench/m1/*.yaml run by `prefix-harness run`: families gpt2, llama,
bloom, t5 x P in {1, 8, 32} x batch in {1, 3}; tiny random models (hidden 64, 2 layers,
4 heads; llama 2 KV heads, head_dim 16; t5 d_kv 16; vocab 256), PEFT
`PrefixTuningConfig(num_virtual_tokens=P)`, 10 torch AdamW steps (lr 0.1) on the prefix
with the harness's built-in sentiment data (byte ids, sequences cut to 16), then 8 greedy
tokens from B left-padded prompts cut to 16 bytes.

Greedy decoding is a manual loop: `PeftModel.generate()` drops the prefix on
transformers 5.24 (ci/fixtures/README.md). The loop starts from the cache PEFT's
`get_prompt` builds and feeds one token per step to the base model, as
ci/fixtures/make_fixtures.py does, with the same `greedy_cached` (ci/peft/peft_greedy.py;
the fastest correct path, checked there to give the same tokens as recomputing through
`PeftModel.forward`).

Whole-process time is what ci/bench/run.sh measures (`/usr/bin/time -v`); this script
also prints its import time and its work time on stderr.
"""

import sys
import time
from pathlib import Path
import warnings

warnings.filterwarnings("ignore")  # past_key_values deprecation noise from PEFT

T0 = time.perf_counter()
import torch  # noqa: E402
from peft import PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peft"))
from peft_greedy import greedy_cached  # noqa: E402  (ci/peft/peft_greedy.py)

T_IMPORT = time.perf_counter() - T0

VOCAB, SEQ, STEPS, NEW_TOKENS, LR = 256, 16, 10, 8, 0.1
SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)

# The harness's built-in data (src/io/data.rs, SENTIMENT).
SENTIMENT = [
    ("the service was quick and the staff were kind", "positive"),
    ("the package arrived broken and late", "negative"),
    ("a calm, bright room with a lovely view", "positive"),
    ("the update deleted my saved files", "negative"),
    ("great value, works exactly as described", "positive"),
    ("the battery dies after an hour", "negative"),
    ("friendly support solved it in minutes", "positive"),
    ("noisy, crowded and overpriced", "negative"),
]


def model_for(family):
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64,
                                          n_layer=2, n_head=4, **SPECIAL))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64,
                                            intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, max_position_embeddings=256,
                                            **SPECIAL))
    if family == "bloom":
        return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2,
                                            n_head=4, **SPECIAL))
    if family == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    raise ValueError(family)


def enc(text):
    return list(text.encode("utf-8"))


def right_pad(rows, fill):
    s = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (s - len(r)) for r in rows], dtype=torch.long)


def train_batch(rows, enc_dec):
    """Right-padded training batch: kwargs for the PEFT model's forward (with labels)."""
    if enc_dec:
        src = [enc(s)[:SEQ] for s, _ in rows]
        tgt = [(enc(l) + [1])[:SEQ] for _, l in rows]
        ids = right_pad(src, 0)
        mask = right_pad([[1] * len(r) for r in src], 0)
        labels = right_pad(tgt, -100)
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    texts = [enc(f"{s} => {l}")[:SEQ] for s, l in rows]
    ids = right_pad(texts, 0)
    mask = right_pad([[1] * len(r) for r in texts], 0)
    # transformers shifts the labels itself; padding is ignored.
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def prompts(b):
    rows = [enc(SENTIMENT[i % len(SENTIMENT)][0])[:SEQ] for i in range(b)]
    s = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (s - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (s - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def run_case(family, p, b):
    torch.manual_seed(11)
    enc_dec = family == "t5"
    task = TaskType.SEQ_2_SEQ_LM if enc_dec else TaskType.CAUSAL_LM
    model = get_peft_model(model_for(family),
                           PrefixTuningConfig(task_type=task, num_virtual_tokens=p))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR,
                            weight_decay=0.0)
    model.train()
    losses = []
    for step in range(STEPS):
        rows = [SENTIMENT[(step * b + i) % len(SENTIMENT)] for i in range(b)]
        out = model(**train_batch(rows, enc_dec))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    ids, mask = prompts(b)
    tokens = greedy_cached(model, ids, mask, enc_dec, NEW_TOKENS)
    return losses, tokens


def main():
    t1 = time.perf_counter()
    n = 0
    for b in (1, 3):
        for family in ("gpt2", "llama", "bloom", "t5"):
            for p in (1, 8, 32):
                losses, tokens = run_case(family, p, b)
                assert len(tokens) == b and all(len(t) == NEW_TOKENS for t in tokens)
                assert losses[-1] == losses[-1]  # not NaN
                n += 1
    work = time.perf_counter() - t1
    print(f"peft_m1: {n} cases, import {T_IMPORT:.2f} s, work {work:.2f} s, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)


if __name__ == "__main__":
    main()
