#!/usr/bin/env python3
# Pinned reference stack (ci/peft/requirements.txt):
#   torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0
#   accelerate==1.15.0 numpy==2.4.6
"""Benchmark M3 (issue 18), the PEFT + transformers + PyTorch side, real size.

The same work as examples/bench_m3.rs: Qwen2ForCausalLM with Qwen2.5-0.5B's geometry
(hidden 896, 24 layers, 14 / 2 heads, intermediate 4864, vocab 151936, tied
embeddings), random weights, PEFT PrefixTuningConfig(num_virtual_tokens=32); synthetic
ids [4, 128]; 10 training steps (PEFT forward with labels, backward, torch AdamW over
the prefix); then 32 greedy tokens from PEFT's get_prompt cache (PeftModel.generate drops
the prefix on transformers 5.24, see ci/fixtures/README.md) under torch.inference_mode.
Prints the same `key=value` lines as the Rust example.
"""

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

T0 = time.perf_counter()
import torch  # noqa: E402
from peft import PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

T_IMPORT = time.perf_counter() - T0
B, S, P, VOCAB = 4, 128, 32, 151936


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(7)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=args.layers, num_attention_heads=14,
                      num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1_000_000.0, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = get_peft_model(Qwen2ForCausalLM(cfg),
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    load_s = time.perf_counter() - t0
    print(f"threads={torch.get_num_threads()}")
    print(f"layers={args.layers}")
    print(f"import_s={T_IMPORT:.3f}")
    print(f"load_s={load_s:.3f}")
    ids = torch.tensor([(i * 2654435761 + 12345) % VOCAB for i in range(B * S)],
                       dtype=torch.long).reshape(B, S)
    mask = torch.ones_like(ids)

    t_train = time.perf_counter()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    model.train()
    times = []
    for step in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        value = loss.item()
        t_fwd = time.perf_counter() - t
        opt.zero_grad()
        loss.backward()
        opt.step()
        el = time.perf_counter() - t
        print(f"# step {step}: loss {value:.4f}, {el:.3f} s (forward {t_fwd:.3f})")
        times.append(el)
    train_s = time.perf_counter() - t_train
    print(f"first_step_s={times[0]:.3f}")
    print(f"step_median_s={statistics.median(times[1:]) if len(times) > 1 else float('nan'):.3f}")
    print(f"train_s={train_s:.3f}")

    t_gen = time.perf_counter()
    model.eval()
    base = model.get_base_model()
    with torch.inference_mode():
        cache = model.get_prompt(B)
        m = torch.cat([torch.ones((B, P), dtype=mask.dtype), mask], 1)
        inp, out_tokens = ids, []
        for _ in range(args.tokens):
            # logits_to_keep=1: only the last position through the LM head (what
            # generate() does)
            out = base(input_ids=inp, attention_mask=m, cache=cache, use_cache=True,
                       logits_to_keep=1)
            cache, inp = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            out_tokens.append(inp)
            m = torch.cat([m, torch.ones_like(inp)], 1)
    assert len(out_tokens) == args.tokens
    print(f"gen_s={time.perf_counter() - t_gen:.3f}")
    print(f"work_s={time.perf_counter() - t0:.3f}")


if __name__ == "__main__":
    main()
