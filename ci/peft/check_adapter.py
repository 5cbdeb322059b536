#!/usr/bin/env python3
# Pinned reference stack (same as ci/peft/requirements.txt):
#   torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0
#   accelerate==1.15.0 numpy==2.4.6
"""Load the harness's PEFT prefix-tuning adapters with the real stack.

For each case folder written by the Rust test `export_for_python`
(tests/it/adapter/python.rs):

    CASE/model/config.json, CASE/model/model.safetensors   tiny model, HF names
    CASE/adapter/adapter_config.json, adapter_model.safetensors   our adapter
    CASE/ours.json   input ids and the harness's logits [B, S, V]

this script builds the transformers model from CASE/model (every weight must be
found: no missing or unexpected key), wraps it with
`PeftModel.from_pretrained(model, CASE/adapter)`, runs one forward pass on the same
ids, prints the logits and the max abs difference with ours, and exits 1 when a
difference exceeds --tol.

    python3 -m venv /tmp/peftenv
    /tmp/peftenv/bin/pip install -r ci/peft/requirements.txt
    PEFT_EXPORT_DIR=/tmp/peft-check cargo test --test it adapter::python::export_for_python -- --ignored
    /tmp/peftenv/bin/python ci/peft/check_adapter.py /tmp/peft-check

CI never runs this script (it needs Python and a few GB of wheels).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
import peft
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM


def load_model(model_dir: Path):
    config = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model, info = cls.from_pretrained(
        model_dir, output_loading_info=True, dtype=torch.float32
    )
    # Tied heads are not stored, so `lm_head.weight` may be reported missing when tied.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys", [])) - tied)
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        raise SystemExit(
            f"{model_dir}: weights do not match {cls.__name__}: missing={missing} "
            f"unexpected={unexpected} mismatched={mismatched}"
        )
    return model.eval()


def write_peft_adapter(case: Path, ours: dict, projection: bool) -> None:
    """The other direction: PEFT's own adapter for the same base model (seeded), saved
    with `save_pretrained` to CASE/peft/adapter, and PEFT's logits for the same ids to
    CASE/peft/logits.json, for the Rust test `import_from_python`."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(1234)
    model = load_model(case / "model")
    pc = PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
        num_virtual_tokens=4,
        prefix_projection=projection,
        encoder_hidden_size=32,
    )
    pm = get_peft_model(model, pc).eval()
    out = case / "peft"
    pm.save_pretrained(out / "adapter")
    ids = torch.tensor(ours["input_ids"], dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ours.get("decoder_input_ids") is not None:
        kwargs["decoder_input_ids"] = torch.tensor(ours["decoder_input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = pm(**kwargs).logits.float()
    (out / "logits.json").write_text(
        json.dumps({"logits_shape": list(logits.shape), "logits": logits.flatten().tolist()})
    )
    print(f"  wrote PEFT's own adapter and logits to {out}")


def check(case: Path, tol: float, show: int, write_peft: bool = False) -> float:
    ours = json.loads((case / "ours.json").read_text())
    if write_peft:
        write_peft_adapter(case, ours, bool(ours.get("projection")))
    model = load_model(case / "model")
    model = PeftModel.from_pretrained(model, case / "adapter").eval()
    ids = torch.tensor(ours["input_ids"], dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ours.get("decoder_input_ids") is not None:
        kwargs["decoder_input_ids"] = torch.tensor(ours["decoder_input_ids"], dtype=torch.long)
    with torch.no_grad():
        theirs = model(**kwargs).logits.float()
    mine = torch.tensor(ours["logits"], dtype=torch.float32).reshape(ours["logits_shape"])
    if tuple(theirs.shape) != tuple(mine.shape):
        print(f"{case.name}: shape differs: PEFT {tuple(theirs.shape)} vs ours {tuple(mine.shape)}")
        return float("inf")
    diff = (theirs - mine).abs().max().item()
    same_argmax = bool((theirs.argmax(-1) == mine.argmax(-1)).all())
    cfg = model.active_peft_config
    print(
        f"{case.name}: PEFT {type(model).__name__} P={cfg.num_virtual_tokens} "
        f"heads={cfg.num_attention_heads} token_dim={cfg.token_dim} layers={cfg.num_layers} "
        f"submodules={cfg.num_transformer_submodules} projection={cfg.prefix_projection}"
    )
    print(f"  logits {tuple(theirs.shape)} [0, 0, :{show}] PEFT: {theirs[0, 0, :show].tolist()}")
    print(f"  logits {tuple(mine.shape)} [0, 0, :{show}] ours: {mine[0, 0, :show].tolist()}")
    verdict = "ok" if diff <= tol else f"FAIL (> {tol:g})"
    print(f"  max abs diff {diff:.3e}, argmax identical: {same_argmax}  {verdict}")
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="export folder, or one case folder")
    ap.add_argument("--only", nargs="*", default=None, help="case names (e.g. gpt2 llama)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--show", type=int, default=4, help="logits printed per case")
    ap.add_argument(
        "--write-peft-adapter",
        action="store_true",
        help="also save PEFT's own adapter + logits under CASE/peft/ (for import_from_python)",
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    cases = [args.root] if (args.root / "ours.json").is_file() else sorted(
        p for p in args.root.iterdir() if (p / "ours.json").is_file()
    )
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    if not cases:
        print(f"no case folders under {args.root}")
        return 2
    failed = []
    for case in cases:
        try:
            diff = check(case, args.tol, args.show, args.write_peft_adapter)
        except Exception as e:  # report every case, keep going
            print(f"{case.name}: ERROR {type(e).__name__}: {e}")
            failed.append(case.name)
            continue
        if not diff <= args.tol:
            failed.append(case.name)
    print(f"{len(cases) - len(failed)} passed, {len(failed)} failed")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
