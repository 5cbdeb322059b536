"""Greedy decoding from the cache PEFT builds, shared by ci/fixtures/make_fixtures.py
(reference fixtures) and ci/bench/peft_m1.py (benchmark M1).

`PeftModel.generate()` drops the prefix on transformers 5.24 (ci/fixtures/README.md), so
both decode by hand from `get_prompt`'s cache."""

import torch


def greedy_cached(model, ids, mask, enc_dec, new_tokens):
    """Greedy decoding with a KV cache: the base model's forward, starting from the cache
    PEFT's get_prompt builds (DynamicCache / EncoderDecoderCache holding the prefix), one
    new token per step. What generate() should do; it checks the cache path.

    `ids, mask: [B, S]` (left-padded, 1 = token); encoder-decoders feed them to the
    encoder and start the decoder from token 0. Returns `new_tokens` ids per row."""
    base = model.get_base_model()
    b, p = ids.shape[0], model.active_peft_config.num_virtual_tokens
    cache = model.get_prompt(b)
    tokens = []
    with torch.no_grad():
        if enc_dec:
            enc = base.get_encoder()(input_ids=ids, attention_mask=mask)
            inp = torch.zeros((b, 1), dtype=torch.long)
            for _ in range(new_tokens):
                out = base(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=inp,
                           cache=cache, use_cache=True)
                cache, inp = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(inp)
        else:
            m = torch.cat([torch.ones((b, p), dtype=mask.dtype), mask], 1)
            inp = ids
            for _ in range(new_tokens):
                out = base(input_ids=inp, attention_mask=m, cache=cache, use_cache=True)
                cache, inp = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(inp)
                m = torch.cat([m, torch.ones_like(inp)], 1)
    return torch.cat(tokens, 1).tolist()
