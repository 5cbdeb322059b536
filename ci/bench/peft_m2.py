#!/usr/bin/env python3
# Pinned reference stack (ci/peft/requirements.txt):
#   torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0
#   accelerate==1.15.0 numpy==2.4.6
"""Benchmark M2 (issue 9), the PEFT + transformers + PyTorch side.

The same work as examples/bench_m2.rs: LlamaForCausalLM (hidden 512, 4 layers, 8 heads /
2 KV heads, head_dim 64, intermediate 1024, vocab 4096) with PEFT
PrefixTuningConfig(num_virtual_tokens=32); synthetic ids [8, 128]; a training step =
PEFT forward with labels + backward + torch AdamW over the prefix (1 warm-up step, then
the median of --steps); greedy decoding of --tokens tokens from PEFT's get_prompt cache
(PeftModel.generate drops the prefix on transformers 5.24, see ci/fixtures/README.md),
under torch.inference_mode. Also the 1024^3 f32 matmul peak. Prints the same
`key=value` lines as the Rust example.
"""

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from peft import PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 512, 4, 8, 2, 64, 1024, 4096
B, S, P = 8, 128, 32


def forward_flops(t, k, head_rows):
    tok = B * t
    h, kvd, i = HIDDEN, KV_HEADS * HEAD_DIM, INTER
    linear = 2.0 * tok * (h * h * 2 + h * kvd * 2 + 3 * h * i)
    attn = 2.0 * 2.0 * B * HEADS * t * k * HEAD_DIM
    head = 2.0 * B * head_rows * h * VOCAB
    return LAYERS * (linear + attn) + head


def matmul_peak():
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    print(f"threads={torch.get_num_threads()}")
    print(f"matmul_peak_gflops={matmul_peak():.1f}")
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(cfg),
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    ids = torch.tensor([(i * 2654435761 + 12345) % VOCAB for i in range(B * S)],
                       dtype=torch.long).reshape(B, S)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    model.train()
    times, fwd, bwd = [], [], []
    for step in range(args.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        value = loss.item()
        t_fwd = time.perf_counter() - t
        opt.zero_grad()
        loss.backward()
        t_bwd = time.perf_counter() - t - t_fwd
        opt.step()
        el = time.perf_counter() - t
        print(f"# step {step}: loss {value:.4f}, {el:.3f} s (forward {t_fwd:.3f}, backward {t_bwd:.3f})")
        if step > 0:
            times.append(el)
            fwd.append(t_fwd)
            bwd.append(t_bwd)
    step_s = statistics.median(times)
    flops = 2.0 * forward_flops(S, P + S, S)
    print(f"train_step_s={step_s:.4f}")
    print(f"train_forward_s={statistics.median(fwd):.4f}")
    print(f"train_backward_s={statistics.median(bwd):.4f}")
    print(f"train_gflop={flops / 1e9:.2f}")
    print(f"train_gflops={flops / step_s / 1e9:.1f}")

    model.eval()
    base = model.get_base_model()

    def greedy(n):
        t = time.perf_counter()
        with torch.inference_mode():
            cache = model.get_prompt(B)
            m = torch.cat([torch.ones((B, P), dtype=mask.dtype), mask], 1)
            inp, out_tokens = ids, []
            for _ in range(n):
                # logits_to_keep=1: only the last position through the LM head (what
                # generate() does)
                out = base(input_ids=inp, attention_mask=m, cache=cache, use_cache=True,
                           logits_to_keep=1)
                cache, inp = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                out_tokens.append(inp)
                m = torch.cat([m, torch.ones_like(inp)], 1)
        assert len(out_tokens) == n
        return time.perf_counter() - t

    greedy(2)  # warm-up
    prefill = greedy(1)
    total = greedy(args.tokens)
    flops = forward_flops(S, P + S, 1) + sum(forward_flops(1, P + S + j, 1)
                                             for j in range(1, args.tokens))
    print(f"gen_total_s={total:.4f}")
    print(f"gen_prefill_s={prefill:.4f}")
    print(f"gen_per_token_s={total / args.tokens:.5f}")
    print(f"gen_decode_per_token_s={(total - prefill) / max(args.tokens - 1, 1):.5f}")
    print(f"gen_gflops={flops / total / 1e9:.1f}")


if __name__ == "__main__":
    main()
