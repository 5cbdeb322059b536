#!/usr/bin/env python3
"""Stack driver: runs prefix-harness cases on the user's real Python stack
(torch + transformers + PEFT) and prints what happened as JSON lines.

The Rust side (prefix-harness) writes one job file per scenario file, runs
``python driver.py JOB.json`` and diffs the result against its own engine. This
docstring is the protocol; the Rust side follows it. Fields may be added in later
revisions, never renamed.

Supported stacks: transformers 4.36 .. 5.x (tuple caches, ``Cache`` classes with
``key_cache``/``value_cache`` lists, transformers 5's ``cache.layers[i].keys/values``),
PEFT 0.6 .. 0.21, any torch those accept. Needs torch, transformers, peft and
safetensors only (numpy optional). One process runs every case of a job.

Invocation and exit codes
-------------------------
``python driver.py JOB.json``. Standard output carries only JSON lines, one object
per line, flushed after every line (anything a library prints goes to stderr).
Human progress goes to stderr.

- exit 0: the job was read and every case was attempted (cases may have failed);
- exit 2: the job file is unreadable or malformed (also a wrong ``protocol`` or bad
  usage); one line on stderr says why, nothing is printed on stdout;
- exit 3: torch, transformers, peft or safetensors cannot be imported; stderr names
  the failed import and a ``pip install`` hint, nothing is printed on stdout.

The job is read and validated before the imports (a malformed job exits 2 even
without torch).

Environment: ``PREFIX_HARNESS_THREADS`` (integer) sets ``torch.set_num_threads``.

JOB.json
--------
::

    {"protocol": 1,
     "cases": [{
       "id": "case id",                                   # string, unique per job
       "model_dir": "/abs/folder",        # config.json + model.safetensors
       "adapter_dir": "/abs/folder",      # adapter_config.json + adapter_model.safetensors
                                          # (PEFT PREFIX_TUNING); not the model folder
       "encoder_decoder": false,
       "cache": {"mode": "none|dynamic|static|sliding|legacy|hybrid",
                 "max_len": null | int, "window": null | int},
       "input_ids": [[int]], "attention_mask": [[0|1]],   # [B, S], left-padded
       "decoder_start_token_id": 0,                       # encoder-decoders only
       "generate": {"max_new_tokens": 8,
                    "strategy": "greedy"
                              | {"sample": {"temperature": 1.0, "top_k": null,
                                            "top_p": null, "seed": 0}}
                              | {"beam": {"num_beams": 2, "length_penalty": 1.0,
                                          "early_stopping": false}},
                    "eos_token_id": null, "pad_token_id": null,
                    "num_return_sequences": 1,
                    "prefill_chunk": null | int},   # the prompt in chunks: generate's
                                                    # prefill_chunk_size (transformers 5;
                                                    # else a note) and the cached phase's
                                                    # calls
       "train": null | {"lr": 0.1, "weight_decay": 0.0, "steps": 3,
                        "batches": [{"input_ids": [[int]], "attention_mask": [[int]],
                                     "decoder_input_ids": null | [[int]],
                                     "labels": [[int]]}]},
       "timeout_s": 300
     }]}

``cache`` and ``generate`` may be omitted (defaults: mode ``dynamic``; 8 new tokens,
greedy, no EOS). ``decoder_start_token_id`` defaults to the model config's.
``eos_token_id: null`` means *no* end-of-sequence token: the model's own
``generation_config`` EOS is disabled too, so every phase decodes exactly
``max_new_tokens`` tokens. With an EOS, every greedy loop behaves like
``generate()``: a finished row continues with ``pad_token_id`` (the EOS when
``pad_token_id`` is null) and decoding stops early when every row has finished.

Output lines
------------
First line::

    {"environment": {"python": "3.11.7", "torch": "...", "transformers": "...",
                     "peft": "...", "safetensors": "...", "numpy": "..." | null,
                     "legacy_cache": bool, "cache_kwarg": "cache" | "past_key_values"}}

(``legacy_cache``: whether this transformers accepts tuple caches; ``cache_kwarg``:
the name transformers 5.x / 4.x models take the cache under.)

Then one line per case, in job order::

    {"id": ..., "status": "ok" | "skip" | "error", "reason": null | str,
     "duration_ms": float, "error": null | ERR,
     "model_type": "gpt2" | ..., "num_virtual_tokens": int | null,
     "adapter_fields_dropped": [str],   # adapter_config.json fields this PEFT lacks
     "phases": null | {
       "forward":   {"logits_last": [[float]], "events": [...], "calls": [...],
                     "error": null | ERR, ...},
       "recompute": {"tokens": [[int]], "error": null | ERR, ...},
       "generate":  {"tokens": [[int]], "events": [...], "calls": [...],
                     "error": null | ERR, "tokens_comparable": bool, ...},
       "cached":    {"tokens": [[int]] | null, "events": [...], "calls": [...],
                     "error": null | ERR, "skipped": null | str, ...},
       "train":     null | {"losses": [float], "error": null | ERR}
     }}

- ``status: "error"``: the case could not be set up (config, model or adapter load
  failed, adapter is not prefix tuning...). ``reason`` is the error as text,
  ``error`` the ERR, ``phases`` is null.
- ``status: "skip"``: the installed stack cannot express the case (see the cache
  mode mapping), or its transformers does not know the model's ``model_type`` (e.g.
  ``qwen3`` on transformers 4.46); ``reason`` says why, ``phases`` is null.
- ``status: "ok"``: every phase was attempted. A phase that raised has its ERR in
  ``error`` (its other fields are null or partial); the other phases still ran.

Phases (all float32, ``model.eval()``, no grad except ``train``):

- ``forward``: ``PeftModel(input_ids, attention_mask)`` (encoder-decoders: plus
  ``decoder_input_ids = [[decoder_start_token_id]] * B``); ``logits_last`` is the
  last position's logits ``[B, V]``. PEFT picks the cache itself; the case's cache
  mode does not apply.
- ``recompute``: greedy decoding through PEFT's forward, re-running the whole
  sequence every step (no cache reuse). Greedy whatever ``strategy`` says; no
  events.
- ``generate``: ``PeftModel.generate(...)`` with the case's strategy; ``tokens`` are
  the new tokens only (``[B * num_return_sequences, N]``; encoder-decoders: without
  the decoder start token). For ``sample``, ``torch.manual_seed(seed)`` is called
  just before and ``tokens_comparable`` is false (our engine's RNG differs).
  Added: ``notes`` (list of strings: settings the version could not apply).
- ``cached``: greedy decoding with a KV cache, like ci/peft/peft_greedy.py: the
  cache built from PEFT's ``get_prompt(B)`` (converted to the case's cache mode),
  then the base model's forward one token per step (decoder-only: attention mask
  ``[1]*P + mask``, growing; encoder-decoders: the encoder once, the decoder from
  ``decoder_start_token_id``). Added: ``skipped`` (null, or why the phase did not
  run: mode ``none`` has no cache), ``notes``.
- ``train`` (only when the job has ``train``): AdamW (betas 0.9/0.999, eps 1e-8,
  the job's lr and weight_decay) over the prefix PEFT stores, i.e. the prompt
  encoder's embedding table ``[P, L*2*token_dim]`` that ``adapter_model.safetensors``
  holds (also for ``prefix_projection`` adapters, whose file holds the MLP output);
  the base model stays frozen. Step ``i`` uses ``batches[i]``: logits of PEFT's
  forward, ``loss = cross_entropy(logits.flatten(0, 1), labels.flatten(),
  ignore_index=-100)`` (labels are already aligned with the logits), backward, step.
  ``losses[i]`` is the loss of step ``i`` before its update. Fewer batches than
  steps is a phase error.

Every phase also has ``duration_ms`` and ``cache_class`` (the class name of the
cache the first model call received, or null). Non-finite floats are written as
null and the phase gets ``"non_finite": true`` (JSON has no NaN).

ERR::

    {"type": "RuntimeError", "message": "...",
     "file": "transformers/cache_utils.py",   # relative to site-packages when inside
     "line": 123, "function": "update",       # the innermost traceback frame
     "stack": [{"file", "line", "function"}, ...]}   # added: up to 12 innermost frames

Events and calls
----------------
While a phase with ``events`` runs, the driver wraps at run time (and restores
after the phase) the ``update`` methods of the transformers cache classes that the
version has (``DynamicCache``, ``StaticCache``, ``SlidingWindowCache``, ...,
transformers 5's per-layer ``DynamicLayer``/``StaticLayer``/... classes; an
``EncoderDecoderCache`` delegates to its two sub-caches, which are told apart as
self/cross attention), their ``reorder_cache`` / ``batch_select_indices`` /
``batch_repeat_interleave``, ``from_legacy_cache``, and ``PeftModel.get_prompt``.
One event per layer write::

    {"step": int,            # model call index within the phase, 0 = prefill
     "layer": int, "attention": "self" | "cross",
     "op": "seed" | "update" | "reorder",
     "key_before": shape | null, "value_before": shape | null,
     "key_written": shape | null, "value_written": shape | null,
     "key_after": shape | null, "value_after": shape | null,
     "failed": bool,
     "cache_class": str,     # added: class whose update ran
     "derived": bool}        # added: true when reconstructed from tuple caches

Shapes are lists of ints of the tensors as stored (bloom's legacy prefix is
``[B*H, D, P]`` for keys). An update event is recorded BEFORE the original update
runs: an update that raises keeps ``failed: true`` and null ``*_after``.

- ``seed``: the prefix placed into the cache before a model call: writes made while
  ``from_legacy_cache`` or ``get_prompt`` run, the driver's own seeding of a
  static/sliding cache, or, when ``get_prompt`` returns an already filled cache
  object, one event per stored layer (``key_before`` null, written = after = the
  stored shape) recorded when a model call actually receives that object (a prefix
  the model ignores gives no seed; the call says ``prefix_ignored``). A seed gets
  the step of the model call it precedes.
- ``update``: a write during a model call.
- ``reorder``: batch rows selected or repeated (beam search); written is null.
- Models that keep tuple caches (transformers 4.x GPT-2, GPT-BigCode) call no cache
  method: their events are derived after each call from the tuples the model got
  and returned (``derived: true``): a seed per layer for the prefix tuple, then an
  update whose written shape is the stored growth.

One entry in ``calls`` per call of the base (transformers) model, caught with a
forward pre-hook::

    {"step": int, "mask": shape | null,        # attention_mask given, e.g. [B, P+S]
     "positions": [[int]] | null,              # position_ids given
     "input_len": int | null,                  # tokens fed (decoder side for enc-dec)
     "cache_class": str | null, "cache_len": int | null,   # added
     "prefix_ignored": bool,   # added: PEFT's prefix was passed under the other cache
                               # kwarg and the model ignores it (transformers 5 takes
                               # `cache` over the deprecated `past_key_values`)
     "decoder_mask": shape | null}             # added, encoder-decoders

Cache mode mapping
------------------
``none``: ``generate(use_cache=False)``; ``cached`` is skipped (no cache).
``dynamic``: ``generate``'s default ``DynamicCache``; ``cached`` uses PEFT's cache,
converted with ``DynamicCache.from_legacy_cache`` when PEFT returns tuples.
``static``: ``generate(cache_implementation="static")`` (``max_cache_len = max_len``
where ``GenerationConfig`` has ``max_cache_len``, transformers 5; else a note);
``cached`` copies the prefix into a ``StaticCache`` of ``max_len`` (default
P + S + max_new_tokens) with ``update``.
``sliding``: needs ``sliding_window`` in the model config, else the case is
skipped. transformers 4.x: ``cache_implementation="sliding_window"`` and
``SlidingWindowCache``; transformers 5: ``DynamicCache(config=...)``, whose layers
are sliding-window layers for such configs (``window`` is informational: the
config's ``sliding_window`` decides).
``hybrid``: transformers 5: ``generate``'s default cache (``DynamicCache`` built
from the config: a sliding-window layer per ``sliding_attention`` layer, a dynamic
layer per other layer; every layer dynamic for configs without layer types);
``cached`` seeds the prefix into ``DynamicCache(config=...)`` with ``update``.
transformers 4.x: skipped (its ``HybridCache`` is a static cache sized by
``max_cache_len``, not the per-layer dynamic cache the engine's mode follows).
``legacy``: tuple caches. transformers 5 removed tuple cache inputs (no
``DynamicCache.from_legacy_cache``): skipped there. On 4.x, ``cached`` passes the
tuples (converted with ``to_legacy_cache`` if PEFT built a Cache) and feeds back
whatever the model returns; ``generate`` runs with its default cache (a note says
so).
On transformers 4.x a model class without ``_supports_cache_class`` (GPT-2,
GPT-BigCode on 4.46) cannot take Cache objects: ``dynamic``, ``static`` and
``sliding`` are skipped there, ``static``/``sliding`` also without
``_supports_static_cache``. Anything else that raises is a result (phase error),
not a skip.

Encoder-decoders: the encoder gets ``input_ids``/``attention_mask``, the decoder
starts from ``decoder_start_token_id``. Whatever PEFT does with the cross-attention
prefix is recorded as is (PEFT 0.21 puts an empty cross cache: no cross seeds;
PEFT 0.12 passes the cross prefix in its tuple).

Determinism: ``torch.manual_seed(0)`` before each case, no dropout (eval mode, also
while training). A case runs at most ``timeout_s`` seconds inside the driver
(SIGALRM, POSIX): the running phase then fails with ``TimeoutError`` and the rest
are not run (each gets that error); the Rust side still kills a hung process.
"""

import functools
import inspect
import json
import math
import os
import platform
import signal
import sys
import time
import traceback

PROTOCOL = 1
MODES = ("none", "dynamic", "static", "sliding", "legacy", "hybrid")

# Real stdout for the protocol; everything else printed goes to stderr.
_OUT = sys.stdout
torch = None  # imported in main()
transformers = None
peft = None


class JobError(Exception):
    """The job file is malformed (exit 2)."""


class CaseTimeout(TimeoutError):
    pass


class Skip(Exception):
    pass


def emit(obj):
    _OUT.write(json.dumps(obj, allow_nan=False) + "\n")
    _OUT.flush()


def log(msg):
    sys.stderr.write(f"[driver] {msg}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- job


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _matrix(v, what, allowed=None):
    if not isinstance(v, list) or not v or not all(isinstance(r, list) for r in v):
        raise JobError(f"{what} must be a non-empty list of lists of ints")
    width = len(v[0])
    for r in v:
        if len(r) != width or not all(_is_int(x) for x in r):
            raise JobError(f"{what} must be a rectangular list of lists of ints")
        if allowed is not None and not all(x in allowed for x in r):
            raise JobError(f"{what} may only hold {sorted(allowed)}")
    return len(v), width


def _opt_int(d, key, what):
    v = d.get(key)
    if v is not None and not _is_int(v):
        raise JobError(f"{what}.{key} must be an integer or null")
    return v


def validate_case(c, i):
    where = f"cases[{i}]"
    if not isinstance(c, dict):
        raise JobError(f"{where} must be an object")
    if not isinstance(c.get("id"), str) or not c["id"]:
        raise JobError(f"{where}.id must be a non-empty string")
    where = f"case {c['id']!r}"
    for key in ("model_dir", "adapter_dir"):
        if not isinstance(c.get(key), str) or not c[key]:
            raise JobError(f"{where}: {key} must be a non-empty string")
    if not isinstance(c.get("encoder_decoder", False), bool):
        raise JobError(f"{where}: encoder_decoder must be a boolean")
    cache = c.setdefault("cache", {"mode": "dynamic"})
    if not isinstance(cache, dict) or cache.get("mode") not in MODES:
        raise JobError(f"{where}: cache.mode must be one of {', '.join(MODES)}")
    _opt_int(cache, "max_len", f"{where}: cache")
    _opt_int(cache, "window", f"{where}: cache")
    b, s = _matrix(c.get("input_ids"), f"{where}: input_ids")
    mb, ms = _matrix(c.get("attention_mask"), f"{where}: attention_mask", {0, 1})
    if (b, s) != (mb, ms):
        raise JobError(f"{where}: attention_mask is [{mb}, {ms}], input_ids [{b}, {s}]")
    _opt_int(c, "decoder_start_token_id", where)
    g = c.setdefault("generate", {})
    if not isinstance(g, dict):
        raise JobError(f"{where}: generate must be an object")
    g.setdefault("max_new_tokens", 8)
    if not _is_int(g["max_new_tokens"]) or g["max_new_tokens"] < 0:
        raise JobError(f"{where}: generate.max_new_tokens must be a non-negative integer")
    for key in ("eos_token_id", "pad_token_id"):
        _opt_int(g, key, f"{where}: generate")
    _opt_int(g, "prefill_chunk", f"{where}: generate")
    g.setdefault("num_return_sequences", 1)
    if not _is_int(g["num_return_sequences"]) or g["num_return_sequences"] < 1:
        raise JobError(f"{where}: generate.num_return_sequences must be a positive integer")
    st = g.setdefault("strategy", "greedy")
    if st != "greedy":
        if not isinstance(st, dict) or len(st) != 1 or next(iter(st)) not in ("sample", "beam"):
            raise JobError(f"{where}: generate.strategy must be \"greedy\", {{\"sample\": ...}} "
                           "or {\"beam\": ...}")
        if not isinstance(next(iter(st.values())), dict):
            raise JobError(f"{where}: generate.strategy parameters must be an object")
    t = c.get("train")
    if t is not None:
        if not isinstance(t, dict):
            raise JobError(f"{where}: train must be an object or null")
        for key in ("lr", "weight_decay"):
            if not isinstance(t.get(key, 0.0), (int, float)) or isinstance(t.get(key), bool):
                raise JobError(f"{where}: train.{key} must be a number")
        if not _is_int(t.get("steps")) or t["steps"] < 0:
            raise JobError(f"{where}: train.steps must be a non-negative integer")
        batches = t.get("batches")
        if not isinstance(batches, list):
            raise JobError(f"{where}: train.batches must be a list")
        for j, bt in enumerate(batches):
            w = f"{where}: train.batches[{j}]"
            if not isinstance(bt, dict):
                raise JobError(f"{w} must be an object")
            _matrix(bt.get("input_ids"), f"{w}.input_ids")
            _matrix(bt.get("attention_mask"), f"{w}.attention_mask", {0, 1})
            _matrix(bt.get("labels"), f"{w}.labels")
            if bt.get("decoder_input_ids") is not None:
                _matrix(bt["decoder_input_ids"], f"{w}.decoder_input_ids")
    ts = c.get("timeout_s")
    if ts is not None and (not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts <= 0):
        raise JobError(f"{where}: timeout_s must be a positive number or null")
    return c


def read_job(path):
    try:
        with open(path, encoding="utf-8") as f:
            job = json.load(f)
    except OSError as e:
        raise JobError(f"cannot read job file {path}: {e.strerror or e}")
    except (ValueError, UnicodeDecodeError) as e:
        raise JobError(f"job file {path} is not valid JSON: {e}")
    if not isinstance(job, dict):
        raise JobError("job must be a JSON object")
    if job.get("protocol") != PROTOCOL:
        raise JobError(f"unsupported protocol {job.get('protocol')!r} (this driver speaks {PROTOCOL})")
    cases = job.get("cases")
    if not isinstance(cases, list):
        raise JobError("job.cases must be a list")
    seen = set()
    for i, c in enumerate(cases):
        validate_case(c, i)
        if c["id"] in seen:
            raise JobError(f"duplicate case id {c['id']!r}")
        seen.add(c["id"])
    return cases


# ------------------------------------------------------------------------ helpers


def version_tuple(v):
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
        if not part.isdigit():
            break
    return tuple(out + [0] * (3 - len(out)))


def rel_path(filename):
    norm = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in norm:
            return norm.rsplit(marker, 1)[1]
    if os.path.abspath(filename) == os.path.abspath(__file__):
        return "driver.py"
    return norm


def err_info(exc):
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    inner = frames[-1] if frames else None
    msg = str(exc)
    if len(msg) > 4000:
        msg = msg[:4000] + "..."
    return {
        "type": type(exc).__name__,
        "message": msg,
        "file": rel_path(inner.filename) if inner else None,
        "line": inner.lineno if inner else None,
        "function": inner.name if inner else None,
        "stack": [{"file": rel_path(f.filename), "line": f.lineno, "function": f.name}
                  for f in frames[-12:]],
    }


def shape(t):
    if t is None or not torch.is_tensor(t):
        return None
    if t.dim() == 1 and t.numel() == 0:  # placeholder of an empty layer
        return None
    return list(t.shape)


def clean_floats(x, flag):
    """Lists of floats with non-finite values as None; flag[0] set if any."""
    if isinstance(x, list):
        return [clean_floats(v, flag) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        flag[0] = True
        return None
    return x


class Feats:
    """What the installed transformers can do."""

    def __init__(self):
        from transformers import cache_utils
        self.cu = cache_utils
        self.tv = version_tuple(transformers.__version__)
        self.DynamicCache = getattr(cache_utils, "DynamicCache", None)
        self.StaticCache = getattr(cache_utils, "StaticCache", None)
        self.SlidingWindowCache = getattr(cache_utils, "SlidingWindowCache", None)
        self.EncoderDecoderCache = getattr(cache_utils, "EncoderDecoderCache", None)
        self.Cache = getattr(cache_utils, "Cache", None)
        # Tuple cache inputs went away with transformers 5 (and from_legacy_cache with them).
        self.legacy = self.DynamicCache is not None and hasattr(self.DynamicCache, "from_legacy_cache")
        self.layered = self.tv >= (5, 0, 0)
        try:
            from transformers import GenerationConfig
            self.gen_max_cache_len = hasattr(GenerationConfig(), "max_cache_len")
        except Exception:
            self.gen_max_cache_len = False
        try:
            from transformers.generation import configuration_utils as gcu
            impls = getattr(gcu, "NEED_SETUP_CACHE_CLASSES_MAPPING", None) or {}
            self.gen_sliding = "sliding_window" in impls
        except Exception:
            self.gen_sliding = False

    def is_cache(self, obj):
        return self.Cache is not None and isinstance(obj, self.Cache)


def read_prefix_config(adapter_dir, config_class):
    """The adapter's PrefixTuningConfig, keeping only the fields the installed PEFT
    knows (a newer PEFT writes fields an older one refuses). Returns (config, the
    names of the fields dropped)."""
    import dataclasses
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    ptype = raw.get("peft_type")
    if ptype != "PREFIX_TUNING":
        raise ValueError(f"adapter {adapter_dir} is {ptype}, not PREFIX_TUNING")
    known = {f.name for f in dataclasses.fields(config_class)}
    kept = {k: v for k, v in raw.items() if k in known}
    dropped = sorted(k for k in raw if k not in known)
    return config_class(**kept), dropped


def cache_kwarg(model):
    """The name the model's forward takes the cache under."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def out_cache(out):
    c = getattr(out, "cache", None)
    if c is None:
        c = getattr(out, "past_key_values", None)
    return c


# ------------------------------------------------------------------------ tracing

ACTIVE = None  # the Tracer of the running phase


def stored(cache, layer):
    """(key, value) tensors a cache object holds for a layer (or Nones)."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        if 0 <= layer < len(layers):
            lay = layers[layer]
            return getattr(lay, "keys", None), getattr(lay, "values", None)
        return None, None
    kc, vc = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if isinstance(kc, list) and isinstance(vc, list):
        k = kc[layer] if 0 <= layer < len(kc) else None
        v = vc[layer] if 0 <= layer < len(vc) else None
        return k, v
    return None, None


def num_layers(cache):
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        return len(layers)
    kc = getattr(cache, "key_cache", None)
    return len(kc) if isinstance(kc, list) else 0


class Tracer:
    """Records cache events and model calls of one phase; installs and removes the
    run-time patches."""

    def __init__(self, feats, peft_model, base):
        self.feats = feats
        self.peft_model = peft_model
        self.base = base
        self.events = []
        self.calls = []
        self.in_forward = False
        self.depth = 0          # inside a wrapped update/reorder (inner calls not recorded)
        self.seeding = 0        # inside from_legacy_cache / get_prompt / driver seeding
        self.constructing = 0   # inside a cache constructor
        self.roles = {}         # id(cache) -> "self" | "cross"
        self.keep = []          # keeps registered objects alive (ids stay unique)
        self.prompt_tuples = set()
        self.prompt_caches = {}  # id -> filled Cache returned by get_prompt, not yet used
        self.pending = None     # tuple prefix seen by the current call
        self.step_updates = 0
        self.quiet = 0
        self._undo = []
        self._hooks = []
        self.first_cache_class = None

    # -- state
    def step(self):
        return len(self.calls) - 1 if self.in_forward else len(self.calls)

    def register(self, cache, role):
        if cache is not None:
            self.roles[id(cache)] = role
            self.keep.append(cache)

    def register_encdec(self, cache):
        edc = self.feats.EncoderDecoderCache
        if edc is not None and isinstance(cache, edc):
            # getattr: also called from the base-class __init__, before the sub-caches exist
            self.register(getattr(cache, "self_attention_cache", None), "self")
            self.register(getattr(cache, "cross_attention_cache", None), "cross")

    def role(self, cache):
        return self.roles.get(id(cache), "self")

    def find_layer(self, layer_obj):
        for obj in self.keep:
            layers = getattr(obj, "layers", None)
            if isinstance(layers, list):
                for i, lay in enumerate(layers):
                    if lay is layer_obj:
                        return i, self.role(obj)
        return -1, "self"

    def event(self, layer, attention, op, kb, vb, kw, vw, ka, va, cls, derived=False):
        ev = {"step": self.step(), "layer": layer, "attention": attention, "op": op,
              "key_before": kb, "value_before": vb, "key_written": kw, "value_written": vw,
              "key_after": ka, "value_after": va, "failed": False, "cache_class": cls,
              "derived": derived}
        self.events.append(ev)
        if op == "update":
            self.step_updates += 1
        return ev

    def snapshot_seed(self, cache):
        """Seed events for every layer a filled cache object holds."""
        edc = self.feats.EncoderDecoderCache
        parts = [(cache, "self")]
        if edc is not None and isinstance(cache, edc):
            self.register_encdec(cache)
            parts = [(cache.self_attention_cache, "self"), (cache.cross_attention_cache, "cross")]
        for part, role in parts:
            for i in range(num_layers(part)):
                k, v = stored(part, i)
                ks, vs = shape(k), shape(v)
                if ks is None and vs is None:
                    continue
                self.event(i, role, "seed", None, None, ks, vs, ks, vs, type(part).__name__)

    # -- wrappers
    def _wrap_cache_update(self, cls, orig):
        tracer = self

        @functools.wraps(orig)
        def update(cache, key_states, value_states, layer_idx, *args, **kwargs):
            if tracer.depth or tracer.constructing or tracer.quiet:
                return orig(cache, key_states, value_states, layer_idx, *args, **kwargs)
            kb, vb = stored(cache, layer_idx)
            op = "seed" if tracer.seeding else "update"
            ev = tracer.event(layer_idx, tracer.role(cache), op, shape(kb), shape(vb),
                              shape(key_states), shape(value_states), None, None,
                              type(cache).__name__)
            ev["failed"] = True
            tracer.depth += 1
            try:
                result = orig(cache, key_states, value_states, layer_idx, *args, **kwargs)
            finally:
                tracer.depth -= 1
            ev["failed"] = False
            ka, va = stored(cache, layer_idx)
            ev["key_after"], ev["value_after"] = shape(ka), shape(va)
            return result
        return update

    def _wrap_layer_update(self, cls, orig):
        tracer = self

        @functools.wraps(orig)
        def update(layer_obj, key_states, value_states, *args, **kwargs):
            if tracer.depth or tracer.constructing or tracer.quiet:
                return orig(layer_obj, key_states, value_states, *args, **kwargs)
            layer, role = tracer.find_layer(layer_obj)
            op = "seed" if tracer.seeding else "update"
            ev = tracer.event(layer, role, op, shape(getattr(layer_obj, "keys", None)),
                              shape(getattr(layer_obj, "values", None)), shape(key_states),
                              shape(value_states), None, None, type(layer_obj).__name__)
            ev["failed"] = True
            tracer.depth += 1
            try:
                result = orig(layer_obj, key_states, value_states, *args, **kwargs)
            finally:
                tracer.depth -= 1
            ev["failed"] = False
            ev["key_after"] = shape(getattr(layer_obj, "keys", None))
            ev["value_after"] = shape(getattr(layer_obj, "values", None))
            return result
        return update

    def _wrap_reorder(self, orig):
        tracer = self

        @functools.wraps(orig)
        def reorder(cache, *args, **kwargs):
            if tracer.depth or tracer.quiet:
                return orig(cache, *args, **kwargs)
            edc = tracer.feats.EncoderDecoderCache
            parts = [(cache, tracer.role(cache))]
            if edc is not None and isinstance(cache, edc):
                tracer.register_encdec(cache)
                parts = [(cache.self_attention_cache, "self"), (cache.cross_attention_cache, "cross")]
            before = [[shape(t) for t in stored(p, i)] for p, _ in parts for i in range(num_layers(p))]
            tracer.depth += 1
            try:
                result = orig(cache, *args, **kwargs)
            finally:
                tracer.depth -= 1
            j = 0
            for p, role in parts:
                for i in range(num_layers(p)):
                    kb, vb = before[j] if j < len(before) else (None, None)
                    j += 1
                    ka, va = (shape(t) for t in stored(p, i))
                    if kb is None and ka is None:
                        continue
                    tracer.event(i, role, "reorder", kb, vb, None, None, ka, va, type(p).__name__)
            return result
        return reorder

    def _wrap_seeding(self, orig):
        tracer = self

        @functools.wraps(orig)
        def seeding(*args, **kwargs):
            tracer.seeding += 1
            try:
                return orig(*args, **kwargs)
            finally:
                tracer.seeding -= 1
        return seeding

    def _wrap_init(self, cls, orig):
        tracer = self

        @functools.wraps(orig)
        def init(obj, *args, **kwargs):
            tracer.constructing += 1
            try:
                orig(obj, *args, **kwargs)
            finally:
                tracer.constructing -= 1
            tracer.register_encdec(obj)
        return init

    def _patch(self, owner, name, new):
        self._undo.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, new)

    def install(self):
        global ACTIVE
        cu = self.feats.cu
        cache_base = self.feats.Cache
        layer_base = getattr(cu, "CacheLayerMixin", None)
        for name in dir(cu):
            cls = getattr(cu, name)
            if not isinstance(cls, type):
                continue
            is_cache = cache_base is not None and issubclass(cls, cache_base)
            is_layer = layer_base is not None and issubclass(cls, layer_base)
            if not (is_cache or is_layer):
                continue
            d = cls.__dict__
            if "update" in d and callable(d["update"]) and not isinstance(d["update"], (classmethod, staticmethod)):
                wrap = self._wrap_layer_update if is_layer else self._wrap_cache_update
                self._patch(cls, "update", wrap(cls, d["update"]))
            if is_cache:
                for meth in ("reorder_cache", "batch_select_indices", "batch_repeat_interleave"):
                    if meth in d and callable(d[meth]) and not isinstance(d[meth], (classmethod, staticmethod)):
                        self._patch(cls, meth, self._wrap_reorder(d[meth]))
                if "from_legacy_cache" in d and isinstance(d["from_legacy_cache"], classmethod):
                    self._patch(cls, "from_legacy_cache",
                                classmethod(self._wrap_seeding(d["from_legacy_cache"].__func__)))
                if "__init__" in d:
                    self._patch(cls, "__init__", self._wrap_init(cls, d["__init__"]))
        # get_prompt: the prefix PEFT builds (instance attribute, removed afterwards)
        orig_gp = self.peft_model.get_prompt
        tracer = self

        @functools.wraps(orig_gp)
        def get_prompt(*args, **kwargs):
            if tracer.quiet:
                return orig_gp(*args, **kwargs)
            n0 = len(tracer.events)
            tracer.seeding += 1
            try:
                result = orig_gp(*args, **kwargs)
            finally:
                tracer.seeding -= 1
            if isinstance(result, (tuple, list)):
                tracer.prompt_tuples.add(id(result))
                tracer.keep.append(result)
            elif tracer.feats.is_cache(result) and len(tracer.events) == n0:
                # seeded when a model call actually receives it (see _pre)
                tracer.prompt_caches[id(result)] = result
            return result
        self.peft_model.__dict__["get_prompt"] = get_prompt
        self._undo.append((self.peft_model, "__instance_get_prompt__", None))
        self._hooks.append(self.base.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._hooks.append(self.base.register_forward_hook(self._post, with_kwargs=True,
                                                           always_call=True))
        ACTIVE = self
        return self

    def restore(self):
        global ACTIVE
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for owner, name, old in reversed(self._undo):
            if name == "__instance_get_prompt__":
                owner.__dict__.pop("get_prompt", None)
            elif old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._undo = []
        ACTIVE = None
        self.keep = []

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False

    # -- hooks
    def _pre(self, module, args, kwargs):
        enc_dec = getattr(module.config, "is_encoder_decoder", False)
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        if enc_dec:
            ids, emb = kwargs.get("decoder_input_ids"), kwargs.get("decoder_inputs_embeds")
        input_len = ids.shape[1] if torch.is_tensor(ids) and ids.dim() >= 2 else (
            emb.shape[1] if torch.is_tensor(emb) and emb.dim() >= 2 else None)
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        # transformers 5 takes `cache` and ignores the deprecated `past_key_values` when
        # both are given (PEFT 0.21's generate passes both)
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        ignored = [c for c in (kwargs.get("cache"), kwargs.get("past_key_values"))
                   if c is not None and c is not cache]
        prefix_ignored = any(id(c) in self.prompt_caches or id(c) in self.prompt_tuples
                             for c in ignored)
        cache_len = None
        if self.feats.is_cache(cache):
            self.register_encdec(cache)
            try:
                cache_len = int(cache.get_seq_length())
            except Exception:
                cache_len = None
        elif isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            try:
                cache_len = int(cache[0][0].shape[-2]) if shape(cache[0][0]) else None
            except Exception:
                cache_len = None
        call = {"step": len(self.calls),
                "mask": list(mask.shape) if torch.is_tensor(mask) else None,
                "positions": pos.tolist() if torch.is_tensor(pos) else None,
                "input_len": int(input_len) if input_len is not None else None,
                "cache_class": type(cache).__name__ if cache is not None else None,
                "cache_len": cache_len,
                "prefix_ignored": prefix_ignored}
        if enc_dec:
            dm = kwargs.get("decoder_attention_mask")
            call["decoder_mask"] = list(dm.shape) if torch.is_tensor(dm) else None
        if self.first_cache_class is None and cache is not None:
            self.first_cache_class = type(cache).__name__
        self.calls.append(call)
        self.in_forward = True
        if id(cache) in self.prompt_caches:
            self.snapshot_seed(self.prompt_caches.pop(id(cache)))
        self.step_updates = 0
        self.pending = cache if isinstance(cache, (tuple, list)) else None

    def _post(self, module, args, kwargs, output):
        self.in_forward_end(output)

    def in_forward_end(self, output):
        try:
            past_in = self.pending
            past_out = out_cache(output) if output is not None else None
            if self.step_updates == 0 and isinstance(past_out, (tuple, list)):
                self._derive(past_in, past_out)
        finally:
            self.in_forward = False
            self.pending = None

    def _derive(self, past_in, past_out):
        """Events for a model that keeps tuple caches: no cache method runs."""
        def kv_pairs(entry):
            entry = tuple(entry) if entry is not None else ()
            pairs = [("self", entry[0:2])]
            if len(entry) >= 4:
                pairs.append(("cross", entry[2:4]))
            return pairs

        def grow(before, after):
            if after is None:
                return None
            if before is None or len(before) != len(after):
                return after
            return [a - b if a != b else a for a, b in zip(after, before)]

        if past_in is not None and id(past_in) in self.prompt_tuples:
            self.prompt_tuples.discard(id(past_in))
            for i, entry in enumerate(past_in):
                for role, kv in kv_pairs(entry):
                    ks, vs = (shape(kv[0]), shape(kv[1])) if len(kv) == 2 else (None, None)
                    self.event(i, role, "seed", None, None, ks, vs, ks, vs, "tuple", derived=True)
        for i, entry in enumerate(past_out):
            before = kv_pairs(past_in[i]) if past_in is not None and i < len(past_in) else []
            for j, (role, kv) in enumerate(kv_pairs(entry)):
                if len(kv) != 2:
                    continue
                ka, va = shape(kv[0]), shape(kv[1])
                kb = vb = None
                if j < len(before) and len(before[j][1]) == 2:
                    kb, vb = shape(before[j][1][0]), shape(before[j][1][1])
                if role == "cross" and kb == ka and vb == va:
                    continue  # cross keys kept, not written
                self.event(i, role, "update", kb, vb, grow(kb, ka), grow(vb, va), ka, va,
                           "tuple", derived=True)


_MISSING = object()


# ------------------------------------------------------------------------- phases


def next_tokens(logits_last, done, eos, pad):
    nxt = logits_last.argmax(-1)
    if eos is None:
        return nxt
    fill = pad if pad is not None else eos
    for b in range(nxt.shape[0]):
        if done[b]:
            nxt[b] = fill
        elif int(nxt[b]) == eos:
            done[b] = True
    return nxt


class Case:
    def __init__(self, spec, feats):
        self.spec = spec
        self.feats = feats
        self.enc_dec = bool(spec.get("encoder_decoder", False))
        self.mode = spec["cache"]["mode"]
        self.max_len = spec["cache"].get("max_len")
        self.ids = torch.tensor(spec["input_ids"], dtype=torch.long)
        self.mask = torch.tensor(spec["attention_mask"], dtype=torch.long)
        self.B, self.S = self.ids.shape
        g = spec["generate"]
        self.n = g["max_new_tokens"]
        self.eos = g.get("eos_token_id")
        self.pad = g.get("pad_token_id")
        self.model = None
        self.base = None
        self.config = None
        self.P = None

    # -- setup
    def load_config(self):
        from transformers import AutoConfig
        self.skip_unknown_model_type()
        self.config = AutoConfig.from_pretrained(self.spec["model_dir"])
        self.start = self.spec.get("decoder_start_token_id")
        if self.start is None:
            self.start = getattr(self.config, "decoder_start_token_id", None) or 0

    def skip_unknown_model_type(self):
        """Skip when config.json names a ``model_type`` this transformers does not
        have (an architecture added after it); an unreadable config is left to
        AutoConfig (a case error)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        try:
            with open(os.path.join(self.spec["model_dir"], "config.json"), encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
            raise Skip(f"model_type {model_type}: transformers {transformers.__version__} "
                       "does not know this architecture")

    def model_class(self):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
        auto = AutoModelForSeq2SeqLM if self.enc_dec else AutoModelForCausalLM
        mapping = getattr(auto, "_model_mapping", None)
        try:
            return mapping[type(self.config)] if mapping is not None else None
        except Exception:
            return None

    def skip_reason(self):
        f, mode, tv = self.feats, self.mode, transformers.__version__
        cls = self.model_class()
        cname = cls.__name__ if cls is not None else type(self.config).__name__
        supports_cache = getattr(cls, "_supports_cache_class", True) if cls is not None else True
        supports_static = getattr(cls, "_supports_static_cache", True) if cls is not None else True
        if mode == "sliding" and getattr(self.config, "sliding_window", None) is None:
            return (f"cache mode sliding: the {self.config.model_type} config has no "
                    "sliding_window, so transformers builds no sliding-window cache for it")
        if mode == "legacy" and not f.legacy:
            return (f"cache mode legacy: transformers {tv} has no tuple (legacy) cache input "
                    "(removed in transformers 5.0, DynamicCache.from_legacy_cache is gone)")
        if mode in ("dynamic", "static", "sliding") and not f.layered and not supports_cache:
            return (f"cache mode {mode}: {cname} on transformers {tv} takes only tuple caches "
                    "(_supports_cache_class is False); use cache mode legacy")
        if mode in ("static", "sliding") and not f.layered and not supports_static:
            return f"cache mode {mode}: {cname} on transformers {tv} has no static cache support"
        if mode == "hybrid" and not f.layered:
            return (f"cache mode hybrid: transformers {tv}'s HybridCache is a static cache sized "
                    "by max_cache_len, not the per-layer dynamic cache of transformers 5")
        if mode == "static" and f.StaticCache is None:
            return f"cache mode static: transformers {tv} has no StaticCache"
        if mode == "sliding":
            if not f.layered and (f.SlidingWindowCache is None or not f.gen_sliding):
                return f"cache mode sliding: transformers {tv} has no SlidingWindowCache"
            if self.enc_dec:
                return "cache mode sliding: not expressible for encoder-decoders"
        return None

    def load(self):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
        from peft import PeftModel, PrefixTuningConfig
        pcfg, self.dropped_fields = read_prefix_config(self.spec["adapter_dir"], PrefixTuningConfig)
        auto = AutoModelForSeq2SeqLM if self.enc_dec else AutoModelForCausalLM
        # transformers 5 renamed torch_dtype to dtype
        kwargs = {"dtype" if self.feats.layered else "torch_dtype": torch.float32}
        base, info = auto.from_pretrained(self.spec["model_dir"], output_loading_info=True,
                                          **kwargs)
        # A weight the folder lacks is initialised at random by transformers: the two
        # sides would then run different models and could still agree by chance (a
        # dropped bias is zero on both). Refuse the case instead.
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
            raise ValueError(
                f"the model folder lacks {len(missing)} weight(s) that transformers "
                f"initialises at random: {shown}")
        base.eval()
        # The config is passed in: older PEFT versions refuse fields newer ones write
        # (e.g. PEFT 0.12 and `init_weights`); read_prefix_config dropped those.
        model = PeftModel.from_pretrained(base, self.spec["adapter_dir"], config=pcfg)
        model.eval()
        self.model = model
        self.base = model.get_base_model()
        self.P = int(model.active_peft_config.num_virtual_tokens)
        self.cache_kw = cache_kwarg(self.base)

    # -- phases
    def peft_forward(self, ids, mask, dec=None):
        kw = {"input_ids": ids, "attention_mask": mask}
        if self.enc_dec:
            kw["decoder_input_ids"] = dec
        return self.model(**kw)

    def dec_start(self, b=None):
        return torch.full((self.B if b is None else b, 1), int(self.start), dtype=torch.long)

    def phase_forward(self, r):
        with Tracer(self.feats, self.model, self.base) as tr:
            r["events"], r["calls"] = tr.events, tr.calls
            with torch.no_grad():
                out = self.peft_forward(self.ids, self.mask, self.dec_start() if self.enc_dec else None)
            r["cache_class"] = tr.first_cache_class
        r["logits_last"] = out.logits[:, -1].float().tolist()

    def phase_recompute(self, r):
        done = [False] * self.B
        toks = []
        with torch.no_grad():
            if self.enc_dec:
                dec = self.dec_start()
                for _ in range(self.n):
                    out = self.peft_forward(self.ids, self.mask, dec)
                    nxt = next_tokens(out.logits[:, -1], done, self.eos, self.pad)
                    toks.append(nxt)
                    dec = torch.cat([dec, nxt[:, None]], 1)
                    if self.eos is not None and all(done):
                        break
            else:
                seq, m = self.ids, self.mask
                for _ in range(self.n):
                    out = self.peft_forward(seq, m)
                    nxt = next_tokens(out.logits[:, -1], done, self.eos, self.pad)
                    toks.append(nxt)
                    seq = torch.cat([seq, nxt[:, None]], 1)
                    m = torch.cat([m, torch.ones((self.B, 1), dtype=m.dtype)], 1)
                    if self.eos is not None and all(done):
                        break
        r["tokens"] = torch.stack(toks, 1).tolist() if toks else [[] for _ in range(self.B)]

    def phase_generate(self, r):
        import copy
        g = self.spec["generate"]
        st = g["strategy"]
        notes = r["notes"]
        gc = copy.deepcopy(self.base.generation_config)
        settings = dict(max_new_tokens=self.n, min_new_tokens=None, min_length=0,
                        eos_token_id=self.eos, pad_token_id=self.pad,
                        num_return_sequences=g["num_return_sequences"],
                        use_cache=self.mode != "none", do_sample=False, num_beams=1)
        if self.enc_dec:
            settings["decoder_start_token_id"] = int(self.start)
        if self.pad is None and self.eos is None:
            settings["pad_token_id"] = None
        if isinstance(st, dict) and "sample" in st:
            s = st["sample"]
            settings.update(do_sample=True, temperature=float(s.get("temperature", 1.0) or 1.0),
                            top_k=s.get("top_k") if s.get("top_k") is not None else 0,
                            top_p=float(s.get("top_p")) if s.get("top_p") is not None else 1.0)
            r["tokens_comparable"] = False
        elif isinstance(st, dict) and "beam" in st:
            b = st["beam"]
            settings.update(num_beams=int(b.get("num_beams", 2)),
                            length_penalty=float(b.get("length_penalty", 1.0)),
                            early_stopping=b.get("early_stopping", False))
        if self.mode == "static":
            settings["cache_implementation"] = "static"
            if self.max_len is not None:
                if self.feats.gen_max_cache_len:
                    settings["max_cache_len"] = int(self.max_len)
                else:
                    notes.append(f"max_len {self.max_len} not applied: transformers "
                                 f"{transformers.__version__} sizes generate's static cache itself")
        elif self.mode == "sliding":
            if self.feats.layered:
                notes.append("sliding: generate's default DynamicCache, whose layers follow the "
                             "config's sliding_window")
            else:
                settings["cache_implementation"] = "sliding_window"
        elif self.mode == "hybrid":
            notes.append("hybrid: generate's default DynamicCache, whose layers follow the "
                         "config's layer types")
        elif self.mode == "legacy":
            notes.append("legacy: generate chooses its own cache (tuples only where the model "
                         "has no Cache class support)")
        chunk = g.get("prefill_chunk")
        if chunk is not None:
            if hasattr(gc, "prefill_chunk_size"):
                settings["prefill_chunk_size"] = int(chunk)
            else:
                notes.append(f"prefill_chunk {chunk} not applied: transformers "
                             f"{transformers.__version__} has no prefill_chunk_size (whole prefill)")
        for k, v in settings.items():
            setattr(gc, k, v)
        saved = self.base.generation_config
        # transformers 5 fills unset (None) values from the model's generation_config: put
        # ours there too, so that eos_token_id None really means no EOS.
        self.base.generation_config = copy.deepcopy(gc)
        try:
            with Tracer(self.feats, self.model, self.base) as tr:
                r["events"], r["calls"] = tr.events, tr.calls
                if isinstance(st, dict) and "sample" in st:
                    torch.manual_seed(int(st["sample"].get("seed", 0) or 0))
                with torch.no_grad():
                    out = self.model.generate(input_ids=self.ids, attention_mask=self.mask,
                                              generation_config=gc)
                r["cache_class"] = tr.first_cache_class
        finally:
            self.base.generation_config = saved
        seqs = out.sequences if hasattr(out, "sequences") else out
        r["tokens"] = (seqs[:, 1:] if self.enc_dec else seqs[:, self.S:]).tolist()

    def prefix_parts(self, prefix):
        """[(self_k, self_v)], [(cross_k, cross_v)] of what get_prompt returned."""
        f = self.feats
        selfp, crossp = [], []
        if isinstance(prefix, (tuple, list)):
            for entry in prefix:
                entry = tuple(entry)
                selfp.append((entry[0], entry[1]))
                if len(entry) >= 4:
                    crossp.append((entry[2], entry[3]))
            return selfp, crossp
        parts = [(prefix, selfp)]
        if f.EncoderDecoderCache is not None and isinstance(prefix, f.EncoderDecoderCache):
            parts = [(prefix.self_attention_cache, selfp), (prefix.cross_attention_cache, crossp)]
        for part, out in parts:
            for i in range(num_layers(part)):
                k, v = stored(part, i)
                if shape(k) is not None:
                    out.append((k, v))
        return selfp, crossp

    def new_static(self, cls, length):
        params = inspect.signature(cls.__init__).parameters
        kw = {"config": self.base.config, "max_cache_len": int(length)}
        if "batch_size" in params:
            kw["batch_size"] = self.B
        if "device" in params:
            kw["device"] = "cpu"
        if "dtype" in params:
            kw["dtype"] = torch.float32
        return cls(**kw)

    def seed_into(self, tr, cache, pairs):
        tr.seeding += 1
        try:
            for i, (k, v) in enumerate(pairs):
                if self.feats.layered:
                    cache.update(k, v, i)
                else:
                    cache.update(k, v, i, {"cache_position": torch.arange(k.shape[-2])})
        finally:
            tr.seeding -= 1

    def build_cache(self, tr, r):
        """The cache the cached phase starts from, in the case's mode."""
        f, mode = self.feats, self.mode
        if mode in ("static", "sliding", "hybrid"):
            tr.quiet += 1
            try:
                prefix = self.model.get_prompt(self.B)
            finally:
                tr.quiet -= 1
            selfp, crossp = self.prefix_parts(prefix)
            length = self.max_len if self.max_len is not None else self.P + self.S + self.n
            if mode == "static":
                self_cache = self.new_static(f.StaticCache, length)
            elif f.layered:  # sliding, hybrid: the config's layer types decide
                self_cache = f.DynamicCache(config=self.base.config)
            else:
                self_cache = self.new_static(f.SlidingWindowCache, length)
            cache = self_cache
            if self.enc_dec:
                cross = f.DynamicCache()
                cache = f.EncoderDecoderCache(self_cache, cross)
                tr.register_encdec(cache)
            self.seed_into(tr, self_cache, selfp)
            if self.enc_dec and crossp:
                self.seed_into(tr, cache.cross_attention_cache, crossp)
                if hasattr(cache, "is_updated"):
                    for i in range(len(crossp)):
                        cache.is_updated[i] = True
            return cache
        prefix = self.model.get_prompt(self.B)
        if mode == "legacy":
            if f.is_cache(prefix):
                r["notes"].append("get_prompt returned a Cache; converted with to_legacy_cache")
                tr.quiet += 1
                try:
                    prefix = prefix.to_legacy_cache()
                finally:
                    tr.quiet -= 1
                tr.prompt_tuples.add(id(prefix))
                tr.keep.append(prefix)
            return prefix
        if isinstance(prefix, (tuple, list)):  # dynamic, PEFT gave tuples
            cls = f.EncoderDecoderCache if self.enc_dec else f.DynamicCache
            tr.prompt_tuples.discard(id(prefix))
            return cls.from_legacy_cache(prefix)
        return prefix

    def phase_cached(self, r):
        if self.mode == "none":
            r["skipped"] = "cache mode none keeps no cache"
            return
        done = [False] * self.B
        toks = []
        with Tracer(self.feats, self.model, self.base) as tr:
            r["events"], r["calls"] = tr.events, tr.calls
            with torch.no_grad():
                cache = self.build_cache(tr, r)
                base, ck = self.base, self.cache_kw
                if self.enc_dec:
                    enc = base.get_encoder()(input_ids=self.ids, attention_mask=self.mask)
                    inp = self.dec_start()
                    for _ in range(self.n):
                        out = base(encoder_outputs=enc, attention_mask=self.mask,
                                   decoder_input_ids=inp, use_cache=True, **{ck: cache})
                        cache = out_cache(out)
                        nxt = next_tokens(out.logits[:, -1], done, self.eos, self.pad)
                        toks.append(nxt)
                        inp = nxt[:, None]
                        if self.eos is not None and all(done):
                            break
                else:
                    m = torch.cat([torch.ones((self.B, self.P), dtype=self.mask.dtype), self.mask], 1)
                    inp = self.ids
                    chunk = self.spec["generate"].get("prefill_chunk")
                    if chunk is not None and chunk < self.S:
                        # The prompt in chunks: each a call over the mask up to its end.
                        r["notes"].append(f"prefill in chunks of {chunk}")
                        for start in range(0, self.S - chunk, chunk):
                            end = start + chunk
                            out = base(input_ids=self.ids[:, start:end],
                                       attention_mask=m[:, :self.P + end], use_cache=True,
                                       **{ck: cache})
                            cache = out_cache(out)
                        last = ((self.S - 1) // chunk) * chunk
                        inp = self.ids[:, last:]
                    for _ in range(self.n):
                        out = base(input_ids=inp, attention_mask=m, use_cache=True, **{ck: cache})
                        cache = out_cache(out)
                        nxt = next_tokens(out.logits[:, -1], done, self.eos, self.pad)
                        toks.append(nxt)
                        inp = nxt[:, None]
                        m = torch.cat([m, torch.ones((self.B, 1), dtype=m.dtype)], 1)
                        if self.eos is not None and all(done):
                            break
            r["cache_class"] = tr.first_cache_class
        r["tokens"] = torch.stack(toks, 1).tolist() if toks else [[] for _ in range(self.B)]

    def phase_train(self, r):
        t = self.spec["train"]
        batches, steps = t["batches"], t["steps"]
        if len(batches) < steps:
            raise ValueError(f"train.steps is {steps} but only {len(batches)} batches were given")
        enc = self.model.prompt_encoder[self.model.active_adapter]
        weight = enc.embedding.weight
        weight.requires_grad_(True)
        opt = torch.optim.AdamW([weight], lr=float(t["lr"]), betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=float(t.get("weight_decay", 0.0)))
        losses = r["losses"]
        with torch.enable_grad():
            for i in range(steps):
                bt = batches[i]
                ids = torch.tensor(bt["input_ids"], dtype=torch.long)
                mask = torch.tensor(bt["attention_mask"], dtype=torch.long)
                labels = torch.tensor(bt["labels"], dtype=torch.long)
                kw = {"input_ids": ids, "attention_mask": mask}
                if self.enc_dec:
                    dec = bt.get("decoder_input_ids")
                    kw["decoder_input_ids"] = (torch.tensor(dec, dtype=torch.long) if dec is not None
                                               else self.dec_start(ids.shape[0]))
                logits = self.model(**kw).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))


PHASE_FIELDS = {
    "forward": {"logits_last": None, "events": [], "calls": []},
    "recompute": {"tokens": None},
    "generate": {"tokens": None, "events": [], "calls": [], "tokens_comparable": True, "notes": []},
    "cached": {"tokens": None, "events": [], "calls": [], "skipped": None, "notes": []},
    "train": {"losses": []},
}


def run_phase(case, name, fn, state):
    import copy
    r = copy.deepcopy(PHASE_FIELDS[name])
    r["error"] = None
    r["cache_class"] = None
    t0 = time.perf_counter()
    if state.get("timed_out"):
        r["error"] = {"type": "TimeoutError", "message": "not run: the case exceeded timeout_s",
                      "file": None, "line": None, "function": None, "stack": []}
    else:
        try:
            fn(r)
        except CaseTimeout as e:
            state["timed_out"] = True
            r["error"] = err_info(e)
        except Exception as e:  # noqa: BLE001 - every failure is a result
            r["error"] = err_info(e)
            log(f"{case.spec['id']}: {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    r["duration_ms"] = (time.perf_counter() - t0) * 1000.0
    flag = [False]
    for key in ("logits_last", "losses"):
        if key in r and r[key] is not None:
            r[key] = clean_floats(r[key], flag)
    if flag[0]:
        r["non_finite"] = True
    return r


def _alarm(signum, frame):
    raise CaseTimeout("the case exceeded timeout_s")


def run_case(spec, feats):
    t0 = time.perf_counter()
    res = {"id": spec["id"], "status": "ok", "reason": None, "duration_ms": 0.0, "error": None,
           "model_type": None, "num_virtual_tokens": None, "phases": None}
    use_alarm = hasattr(signal, "SIGALRM") and spec.get("timeout_s")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, float(spec["timeout_s"]))
    try:
        torch.manual_seed(0)
        case = Case(spec, feats)
        try:
            case.load_config()
            res["model_type"] = getattr(case.config, "model_type", None)
            reason = case.skip_reason()
            if reason is not None:
                raise Skip(reason)
            case.load()
            res["num_virtual_tokens"] = case.P
            res["adapter_fields_dropped"] = case.dropped_fields
        except Skip as s:
            res.update(status="skip", reason=str(s))
            return res
        except Exception as e:  # noqa: BLE001
            res.update(status="error", reason=f"{type(e).__name__}: {e}", error=err_info(e))
            return res
        state = {}
        phases = {}
        phases["forward"] = run_phase(case, "forward", case.phase_forward, state)
        phases["recompute"] = run_phase(case, "recompute", case.phase_recompute, state)
        phases["generate"] = run_phase(case, "generate", case.phase_generate, state)
        phases["cached"] = run_phase(case, "cached", case.phase_cached, state)
        phases["train"] = (run_phase(case, "train", case.phase_train, state)
                           if spec.get("train") is not None else None)
        res["phases"] = phases
        return res
    except CaseTimeout as e:
        res.update(status="error", reason="TimeoutError: the case exceeded timeout_s",
                   error=err_info(e), phases=None)
        return res
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
        res["duration_ms"] = (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------- main


def import_stack():
    global torch, transformers, peft
    mods = {}
    for name in ("torch", "transformers", "peft", "safetensors"):
        try:
            mods[name] = __import__(name)
        except Exception as e:  # noqa: BLE001 - ImportError or a broken install
            sys.stderr.write(f"driver: cannot import {name} ({type(e).__name__}: {e}); "
                             f"install the stack, e.g. `pip install torch transformers peft "
                             f"safetensors`\n")
            sys.exit(3)
    torch, transformers, peft = mods["torch"], mods["transformers"], mods["peft"]
    try:
        import numpy
        np_version = numpy.__version__
    except Exception:  # noqa: BLE001
        np_version = None
    return mods, np_version


def main(argv):
    sys.stdout = sys.stderr  # library prints must not reach the protocol stream
    if len(argv) != 2:
        sys.stderr.write("usage: driver.py JOB.json\n")
        return 2
    try:
        cases = read_job(argv[1])
    except JobError as e:
        sys.stderr.write(f"driver: malformed job: {e}\n")
        return 2
    mods, np_version = import_stack()
    threads = os.environ.get("PREFIX_HARNESS_THREADS")
    if threads:
        try:
            torch.set_num_threads(int(threads))
        except ValueError:
            log(f"ignoring PREFIX_HARNESS_THREADS={threads!r}")
    feats = Feats()
    emit({"environment": {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": getattr(mods["safetensors"], "__version__", None),
        "numpy": np_version,
        "legacy_cache": feats.legacy,
        "cache_kwarg": "cache" if feats.layered and _takes_cache_kwarg() else "past_key_values",
    }})
    for i, spec in enumerate(cases):
        log(f"case {i + 1}/{len(cases)}: {spec['id']}")
        emit(run_case(spec, feats))
    return 0


def _takes_cache_kwarg():
    try:
        from transformers import GPT2LMHeadModel
        return "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv))
