"""Tests of src/harness/stack/driver.py (the stack driver) against the installed stack.

Run with the interpreter of the stack under test, from the repository root:

    PY -m unittest discover -s ci/stack -p 'test_*.py'

They build tiny models with transformers' own classes in a temporary folder (hidden
32, 2 layers, 4 heads, vocabulary 64), wrap them with PEFT prefix tuning, save model and
adapter into separate folders (transformers 5 loads an adapter_config.json found next
to config.json), write jobs, run the driver as a subprocess and check what it reports
against PEFT run in this process. Expectations that depend on the versions say so
(`OLD`: transformers < 4.47, the PEFT issue 2192 era; `NEW`: transformers >= 5).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "src" / "harness" / "stack" / "driver.py"


def _version(v):
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


TV = _version(transformers.__version__)
OLD = TV < (4, 47, 0)   # bloom turns PEFT's 3-D prefix tuple into a 4-D DynamicCache: issue 2192
NEW = TV >= (5, 0, 0)   # no tuple caches; `cache` kwarg

VOCAB = 64
B, S, N = 2, 5, 6
SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
# Bigger than transformers' default so that greedy tokens are not decided by float noise.
INIT = 0.4


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, n_inner=64, initializer_range=INIT, **SPECIAL))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=12,
                                        max_position_embeddings=128, initializer_range=INIT,
                                        **SPECIAL))


def _bloom():
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                        initializer_range=INIT, **SPECIAL))


def _bigcode():
    return GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=VOCAB, n_positions=64, n_embd=32,
                                                  n_layer=2, n_head=4, n_inner=64,
                                                  multi_query=True, initializer_range=INIT,
                                                  **SPECIAL))


def _t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=12, d_ff=64,
                                               num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0,
                                               eos_token_id=1))


# family -> (builder, P, token_dim or None, encoder-decoder)
FAMILIES = {
    "gpt2": (_gpt2, 4, None, False),
    # token_dim 48 = 4 heads x head_dim 12: PEFT 0.12 derives head_dim from hidden_size (8);
    # both versions then reduce it to the 2 KV heads ([B, 2, P, 12]).
    "llama": (_llama, 4, 48, False),
    "bloom": (_bloom, 8, None, False),
    "gpt_bigcode": (_bigcode, 4, None, False),
    # PEFT derives T5's token_dim from d_model (32), but d_kv * heads = 48.
    "t5": (_t5, 4, 48, True),
}

TMP = None
BUILT = {}


def build(family):
    """Model and adapter folders of a family (built once per test run)."""
    if family in BUILT:
        return BUILT[family]
    fn, p, token_dim, enc_dec = FAMILIES[family]
    torch.manual_seed(7)
    model = fn().eval()
    mdir, adir = Path(TMP) / family / "model", Path(TMP) / family / "adapter"
    model.save_pretrained(mdir)
    kw = dict(task_type="SEQ_2_SEQ_LM" if enc_dec else "CAUSAL_LM", num_virtual_tokens=p)
    if token_dim is not None:
        kw["token_dim"] = token_dim
    torch.manual_seed(8)
    get_peft_model(model, PrefixTuningConfig(**kw)).save_pretrained(adir)
    BUILT[family] = (str(mdir), str(adir), p, enc_dec)
    return BUILT[family]


def load_peft(family):
    mdir, adir, _, enc_dec = build(family)
    auto = AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM
    kw = {"dtype" if NEW else "torch_dtype": torch.float32}
    return PeftModel.from_pretrained(auto.from_pretrained(mdir, **kw).eval(), adir).eval()


def prompt():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (B, S), generator=g)
    mask = torch.ones((B, S), dtype=torch.long)
    ids[1, :2] = 0  # row 1 left-padded by 2
    mask[1, :2] = 0
    return ids.tolist(), mask.tolist()


def case(family, mode="dynamic", cid=None, **extra):
    mdir, adir, _, enc_dec = build(family)
    ids, mask = prompt()
    c = {"id": cid or f"{family}-{mode}", "model_dir": mdir, "adapter_dir": adir,
         "encoder_decoder": enc_dec, "cache": {"mode": mode, "max_len": None, "window": None},
         "input_ids": ids, "attention_mask": mask, "decoder_start_token_id": 0,
         "generate": {"max_new_tokens": N, "strategy": "greedy", "eos_token_id": None,
                      "pad_token_id": None, "num_return_sequences": 1},
         "train": None, "timeout_s": 120}
    c.update(extra)
    return c


def unknown_model_type_dir():
    """A copy of the llama model folder whose config.json names a model_type no
    transformers knows (as qwen3 is unknown to transformers 4.46)."""
    src = Path(build("llama")[0])
    dst = Path(TMP) / "unknown-model-type"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "no_such_architecture"
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def missing_bias_dir():
    """A copy of the llama model folder whose model.safetensors lacks one weight (what
    an exporter that never wrote a bias would hand over)."""
    from safetensors.torch import load_file, save_file
    src = Path(build("llama")[0])
    dst = Path(TMP) / "missing-weight"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(str(dst / "model.safetensors"))
    name = sorted(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))[0]
    del tensors[name]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def run_driver(job, python=None, args=()):
    """(exit code, stdout lines as JSON, stderr) of the driver on a job object/text."""
    path = Path(TMP) / f"job-{os.getpid()}-{len(os.listdir(TMP))}.json"
    path.write_text(job if isinstance(job, str) else json.dumps(job))
    env = dict(os.environ, PREFIX_HARNESS_THREADS="1")
    p = subprocess.run([python or sys.executable, *args, str(DRIVER), str(path)],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    return p.returncode, lines, p.stderr


def greedy_by_hand(family):
    """Greedy decoding through PEFT's forward, whole sequence every step."""
    model = load_peft(family)
    _, _, _, enc_dec = build(family)
    ids, mask = (torch.tensor(x) for x in prompt())
    out = []
    with torch.no_grad():
        if enc_dec:
            dec = torch.zeros((B, 1), dtype=torch.long)
            for _ in range(N):
                nxt = model(input_ids=ids, attention_mask=mask,
                            decoder_input_ids=dec).logits[:, -1].argmax(-1)
                out.append(nxt)
                dec = torch.cat([dec, nxt[:, None]], 1)
        else:
            for _ in range(N):
                nxt = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
                out.append(nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype)], 1)
    return torch.stack(out, 1).tolist()


def setUpModule():
    global TMP
    TMP = tempfile.mkdtemp(prefix="stack-driver-test-")
    torch.set_num_threads(1)


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


class Matrix(unittest.TestCase):
    """One driver run over the families x a few cache modes, shared by the tests."""

    @classmethod
    def setUpClass(cls):
        cases = []
        for fam in FAMILIES:
            for mode in ("dynamic", "legacy", "none"):
                cases.append(case(fam, mode))
        cases.append(case("gpt2", "sliding"))
        cases.append(case("llama", "static"))
        cases.append(case("gpt2", "dynamic", cid="missing-model",
                          model_dir=str(Path(TMP) / "no-such-model")))
        cases.append(case("llama", "dynamic", cid="unknown-model-type",
                          model_dir=unknown_model_type_dir()))
        cases.append(case("llama", "dynamic", cid="missing-weight",
                          model_dir=missing_bias_dir()))
        train = {"lr": 0.1, "weight_decay": 0.0, "steps": 3, "batches": []}
        ids, mask = prompt()
        labels = [[t if m else -100 for t, m in zip(r[1:] + [-100], mr)] for r, mr in zip(ids, mask)]
        for _ in range(3):
            train["batches"].append({"input_ids": ids, "attention_mask": mask,
                                     "decoder_input_ids": None, "labels": labels})
        chunked = case("llama", "dynamic", cid="llama-chunked")
        chunked["generate"]["prefill_chunk"] = 2
        cases.append(chunked)
        cases.append(case("llama", "dynamic", cid="llama-train", train=train))
        cls.code, cls.lines, cls.stderr = run_driver({"protocol": 1, "cases": cases})
        cls.by_id = {line["id"]: line for line in cls.lines[1:]}
        cls.cases = cases

    def test_exit_and_line_order(self):
        self.assertEqual(self.code, 0, self.stderr[-3000:])
        self.assertEqual([line["id"] for line in self.lines[1:]], [c["id"] for c in self.cases])

    def test_environment_line(self):
        env = self.lines[0]["environment"]
        import peft
        import safetensors
        self.assertEqual(env["torch"], torch.__version__)
        self.assertEqual(env["transformers"], transformers.__version__)
        self.assertEqual(env["peft"], peft.__version__)
        self.assertEqual(env["safetensors"], safetensors.__version__)
        self.assertEqual(env["python"], ".".join(map(str, sys.version_info[:3])))
        self.assertEqual(env["legacy_cache"], not NEW)

    def test_missing_model_is_a_case_error(self):
        r = self.by_id["missing-model"]
        self.assertEqual(r["status"], "error")
        self.assertIsNone(r["phases"])
        self.assertIn("no-such-model", r["reason"])
        self.assertTrue(r["error"]["type"])
        # the other cases still ran
        self.assertEqual(self.by_id["llama-dynamic"]["status"], "ok")

    def test_a_weight_missing_from_the_folder_is_a_case_error(self):
        # transformers would initialise it at random: the sides would differ in model.
        r = self.by_id["missing-weight"]
        self.assertEqual(r["status"], "error")
        self.assertIn("lacks 1 weight(s)", r["reason"])
        self.assertIn("layers.0.self_attn.q_proj.weight", r["reason"])

    def test_recompute_equals_hand_rolled_greedy(self):
        for fam in FAMILIES:
            with self.subTest(family=fam):
                r = self.by_id[f"{fam}-none"]
                self.assertEqual(r["status"], "ok")
                rec = r["phases"]["recompute"]
                if fam == "bloom" and OLD:
                    # PEFT issue 2192: the 3-D bloom prefix meets a 4-D DynamicCache
                    self.assertEqual(rec["error"]["type"], "RuntimeError")
                    continue
                self.assertIsNone(rec["error"])
                self.assertEqual(rec["tokens"], greedy_by_hand(fam))

    def test_forward_logits_match_peft(self):
        for fam in ("gpt2", "llama", "t5"):
            with self.subTest(family=fam):
                model = load_peft(fam)
                ids, mask = (torch.tensor(x) for x in prompt())
                kw = {"decoder_input_ids": torch.zeros((B, 1), dtype=torch.long)} if fam == "t5" else {}
                with torch.no_grad():
                    want = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1]
                got = torch.tensor(self.by_id[f"{fam}-none"]["phases"]["forward"]["logits_last"])
                self.assertEqual(list(got.shape), [B, VOCAB])
                self.assertLess((got - want).abs().max().item(), 1e-5)

    def test_forward_events_and_calls(self):
        # After the prefill with the prefix, every layer holds P + S keys.
        expect = {"llama": ([B, 2, None, 12], 4), "gpt2": ([B, 4, None, 8], 4),
                  "gpt_bigcode": None, "t5": ([B, 4, None, 12], 4)}
        for fam, spec in expect.items():
            if spec is None:
                continue
            with self.subTest(family=fam):
                r = self.by_id[f"{fam}-dynamic"]
                if OLD and fam == "gpt2":
                    self.assertEqual(r["status"], "skip")  # tuple-only model on 4.46
                    r = self.by_id["gpt2-legacy"]
                self.assertEqual(r["status"], "ok", r.get("reason"))
                fw = r["phases"]["forward"]
                self.assertIsNone(fw["error"])
                shp, p = spec
                self.assertEqual(len(fw["calls"]), 1)
                call = fw["calls"][0]
                self.assertEqual(call["step"], 0)
                self.assertEqual(call["input_len"], 1 if fam == "t5" else S)
                self.assertEqual(call["mask"], [B, S] if fam == "t5" else [B, p + S])
                seeds = [e for e in fw["events"] if e["op"] == "seed" and e["attention"] == "self"]
                ups = [e for e in fw["events"] if e["op"] == "update" and e["attention"] == "self"]
                self.assertEqual(sorted(e["layer"] for e in seeds), [0, 1])
                self.assertEqual(sorted(e["layer"] for e in ups), [0, 1])
                seq = 1 if fam == "t5" else S
                for e in seeds:
                    self.assertEqual(e["step"], 0)
                    self.assertEqual(e["key_after"], shp[:2] + [p] + shp[3:])
                for e in ups:
                    self.assertFalse(e["failed"])
                    self.assertEqual(e["key_before"], shp[:2] + [p] + shp[3:])
                    self.assertEqual(e["key_written"], shp[:2] + [seq] + shp[3:])
                    self.assertEqual(e["key_after"], shp[:2] + [p + seq] + shp[3:])

    def test_bloom_forward(self):
        r = self.by_id["bloom-dynamic"]
        self.assertEqual(r["status"], "ok")
        fw = r["phases"]["forward"]
        if OLD:
            err = fw["error"]
            self.assertEqual(err["type"], "RuntimeError")
            self.assertEqual(err["message"], "Tensors must have same number of dimensions: got 3 and 4")
            self.assertEqual(err["file"], "transformers/cache_utils.py")
            self.assertEqual(err["function"], "update")
            failed = [e for e in fw["events"] if e["failed"]]
            self.assertEqual(len(failed), 1)
            e = failed[0]
            # bloom's legacy prefix: keys [B*H, D, P], stored as is; new keys [B, H, S, D]
            self.assertEqual((e["layer"], e["attention"], e["op"]), (0, "self", "update"))
            self.assertEqual(e["key_before"], [B * 4, 8, 8])
            self.assertEqual(e["key_written"], [B, 4, S, 8])
            self.assertIsNone(e["key_after"])
        else:
            self.assertIsNone(fw["error"])
            self.assertEqual(len(fw["logits_last"]), B)

    def test_cached_equals_recompute(self):
        fams = ["llama", "t5", "gpt_bigcode"] + ([] if OLD else ["gpt2", "bloom"])
        for fam in fams:
            with self.subTest(family=fam):
                r = self.by_id[f"{fam}-dynamic"]
                if OLD and fam == "gpt_bigcode":
                    self.assertEqual(r["status"], "skip")
                    r = self.by_id["gpt_bigcode-legacy"]
                ph = r["phases"]
                self.assertIsNone(ph["cached"]["error"])
                self.assertEqual(ph["cached"]["tokens"], ph["recompute"]["tokens"])
                self.assertEqual(len(ph["cached"]["calls"]), N)

    def test_chunked_prefill_decodes_like_the_whole_prompt(self):
        r = self.by_id["llama-chunked"]
        self.assertEqual(r["status"], "ok")
        c = r["phases"]["cached"]
        self.assertIsNone(c["error"])
        self.assertEqual(c["tokens"], self.by_id["llama-dynamic"]["phases"]["cached"]["tokens"])
        # one call per chunk before the last, then the last chunk and N - 1 tokens
        chunks = -(-S // 2)
        self.assertEqual(len(c["calls"]), chunks - 1 + N)
        self.assertIn("prefill in chunks of 2", r["phases"]["cached"].get("notes", []) + r.get("notes", []))

    def test_static_cache(self):
        r = self.by_id["llama-static"]
        self.assertEqual(r["status"], "ok")
        c = r["phases"]["cached"]
        self.assertIsNone(c["error"])
        self.assertEqual(c["tokens"], r["phases"]["recompute"]["tokens"])
        seeds = [e for e in c["events"] if e["op"] == "seed"]
        self.assertEqual(len(seeds), 2)
        # the static cache is preallocated: P + S + N positions
        self.assertEqual(seeds[0]["key_after"], [B, 2, 4 + S + N, 12])

    def test_generate_phase(self):
        for fam in ("llama", "t5"):
            with self.subTest(family=fam):
                g = self.by_id[f"{fam}-dynamic"]["phases"]["generate"]
                self.assertIsNone(g["error"])
                self.assertEqual(len(g["tokens"]), B)
                self.assertTrue(all(len(row) == N for row in g["tokens"]))
                self.assertTrue(g["tokens_comparable"])
                self.assertEqual(len(g["calls"]), N)
                self.assertEqual([c["step"] for c in g["calls"]], list(range(N)))

    def test_generate_drops_the_prefix(self):
        # Both stacks lose the prefix in PeftModel.generate (Llama): transformers 4.46 hands
        # PEFT 0.12 an empty DynamicCache, so it injects nothing; with transformers 5.24 PEFT
        # 0.21 passes it as `past_key_values` next to generate's `cache`, which wins.
        g = self.by_id["llama-dynamic"]["phases"]["generate"]
        self.assertEqual([e for e in g["events"] if e["op"] == "seed"], [])
        first = [e for e in g["events"] if e["step"] == 0 and e["op"] == "update"]
        self.assertEqual(len(first), 2)
        self.assertTrue(all(e["key_before"] is None for e in first))
        self.assertEqual(g["calls"][0]["prefix_ignored"], NEW)
        rec = self.by_id["llama-dynamic"]["phases"]["recompute"]["tokens"]
        self.assertNotEqual(g["tokens"], rec)

    def test_none_mode(self):
        r = self.by_id["llama-none"]
        self.assertEqual(r["phases"]["cached"]["skipped"], "cache mode none keeps no cache")
        self.assertIsNone(r["phases"]["cached"]["tokens"])
        g = r["phases"]["generate"]
        if OLD:
            # PEFT 0.12's prepare_inputs_for_generation reads model_kwargs["past_key_values"],
            # which transformers 4.46 does not set with use_cache=False
            self.assertEqual((g["error"]["type"], g["error"]["message"]), ("KeyError", "'past_key_values'"))
            self.assertEqual(g["error"]["file"], "peft/peft_model.py")
        else:
            self.assertIsNone(g["error"])
            self.assertEqual(len(g["tokens"]), B)

    def test_unknown_model_type_is_a_skip(self):
        r = self.by_id["unknown-model-type"]
        self.assertEqual(r["status"], "skip")
        self.assertIn("no_such_architecture", r["reason"])
        self.assertIn(transformers.__version__, r["reason"])
        self.assertIsNone(r["phases"])

    def test_skips(self):
        r = self.by_id["gpt2-sliding"]
        self.assertEqual(r["status"], "skip")
        self.assertIn("sliding_window", r["reason"])
        self.assertIsNone(r["phases"])
        legacy = self.by_id["llama-legacy"]
        if NEW:
            self.assertEqual(legacy["status"], "skip")
            self.assertIn("legacy", legacy["reason"])
        else:
            self.assertEqual(legacy["status"], "ok")
            self.assertIsNone(legacy["phases"]["cached"]["error"])

    def test_legacy_tuple_events_on_old(self):
        if NEW:
            self.skipTest("transformers >= 5 has no tuple caches")
        r = self.by_id["gpt2-legacy"]
        ev = r["phases"]["cached"]["events"]
        self.assertTrue(all(e["derived"] for e in ev))
        steps = sorted({e["step"] for e in ev})
        self.assertEqual(steps, list(range(N)))
        last = [e for e in ev if e["step"] == N - 1 and e["layer"] == 0][0]
        self.assertEqual(last["key_written"], [B, 4, 1, 8])
        self.assertEqual(last["key_after"], [B, 4, 4 + S + N - 1, 8])

    def test_train_losses(self):
        t = self.by_id["llama-train"]["phases"]["train"]
        self.assertIsNone(t["error"])
        self.assertEqual(len(t["losses"]), 3)
        # the first loss is the plain loss of PEFT's forward with the adapter as saved
        model = load_peft("llama")
        b = self.cases[-1]["train"]["batches"][0]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(b["input_ids"]),
                           attention_mask=torch.tensor(b["attention_mask"])).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                 torch.tensor(b["labels"]).reshape(-1),
                                                 ignore_index=-100).item()
        self.assertAlmostEqual(t["losses"][0], want, places=5)
        self.assertLess(t["losses"][-1], t["losses"][0])
        self.assertIsNone(self.by_id["llama-dynamic"]["phases"]["train"])


class Protocol(unittest.TestCase):
    def test_malformed_jobs_exit_2(self):
        good = case("gpt2", "dynamic")
        bad = {
            "not json": "{",
            "no protocol": json.dumps({"cases": []}),
            "protocol 2": json.dumps({"protocol": 2, "cases": []}),
            "bad mode": json.dumps({"protocol": 1, "cases": [dict(good, cache={"mode": "paged"})]}),
            "ragged ids": json.dumps({"protocol": 1, "cases": [dict(good, input_ids=[[1, 2], [3]])]}),
            "mask shape": json.dumps({"protocol": 1, "cases": [dict(good, attention_mask=[[1]])]}),
            "bad strategy": json.dumps({"protocol": 1, "cases": [
                dict(good, generate=dict(good["generate"], strategy="topk"))]}),
        }
        for name, text in bad.items():
            with self.subTest(job=name):
                code, lines, err = run_driver(text)
                self.assertEqual(code, 2)
                self.assertEqual(lines, [])
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn("malformed job", err)

    def test_missing_job_file_exit_2(self):
        p = subprocess.run([sys.executable, str(DRIVER), str(Path(TMP) / "nope.json")],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stdout, "")
        self.assertIn("cannot read job file", p.stderr)

    def test_import_failure_exit_3(self):
        # -S: no site-packages, so `import torch` fails
        code, lines, err = run_driver({"protocol": 1, "cases": []}, args=("-S",))
        self.assertEqual(code, 3)
        self.assertEqual(lines, [])
        self.assertIn("cannot import torch", err)
        self.assertIn("pip install", err)

    def test_empty_job(self):
        code, lines, _ = run_driver({"protocol": 1, "cases": []})
        self.assertEqual(code, 0)
        self.assertEqual(len(lines), 1)
        self.assertIn("environment", lines[0])


if __name__ == "__main__":
    unittest.main()
