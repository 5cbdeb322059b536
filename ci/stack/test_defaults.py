"""The engine's config defaults against transformers' config classes.

A field absent from a `config.json` takes its value from
`src/engine/model/defaults/<model_type>.json` (`Family::hf_defaults`). These tests
compare every entry of those files with the default of the same parameter of the
transformers class's `__init__` (what transformers uses when the field is absent), on
the installed stack. A class that the installed transformers does not have (Qwen 3 and
Gemma 3 before 4.50) is skipped, and so is a field its `__init__` does not take
(`rope_theta` moved into `rope_parameters` in transformers 5).

Run with the interpreter of the stack under test, from the repository root:

    PY -m unittest discover -s ci/stack -p 'test_*.py'
"""

import inspect
import json
import unittest
from pathlib import Path

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

DEFAULTS = Path(__file__).resolve().parents[2] / "src" / "engine" / "model" / "defaults"

# Where a transformers version's default differs from the one the engine follows
# (transformers 5), as (model_type, field, major version): the reason.
KNOWN = {
    ("gemma2", field, 4): "transformers 4.x's Gemma2Config defaults are Gemma 2 9B's; 5.x's are 2B's"
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "query_pre_attn_scalar",
    )
}


def signature_defaults(cls):
    """The defaults of `cls.__init__`'s named parameters."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


class Defaults(unittest.TestCase):
    def test_every_default_is_transformers_default(self):
        files = sorted(DEFAULTS.glob("*.json"))
        self.assertGreaterEqual(len(files), 7, f"defaults files in {DEFAULTS}")
        major = int(transformers.__version__.split(".")[0])
        compared = 0
        for path in files:
            model_type = path.stem
            ours = json.loads(path.read_text())
            with self.subTest(model_type=model_type):
                if model_type not in CONFIG_MAPPING:
                    continue
                theirs = signature_defaults(CONFIG_MAPPING[model_type])
                for field, value in ours.items():
                    if field not in theirs or (model_type, field, major) in KNOWN:
                        continue
                    compared += 1
                    with self.subTest(field=field):
                        self.assertEqual(
                            value,
                            theirs[field],
                            f"{path.name}: `{field}` is {value!r}, transformers "
                            f"{transformers.__version__} "
                            f"{CONFIG_MAPPING[model_type].__name__} has {theirs[field]!r}",
                        )
        # 107 fields on transformers 5.24, 72 on 4.46.3 (no Qwen 3 or Gemma 3).
        self.assertGreater(compared, 50)


if __name__ == "__main__":
    unittest.main()
