"""The sampler's batch machinery: continuous batching, per-row random streams (same seed,
same rollouts whatever the sandbox's timing), the progress contract, the preallocated cache
growing and compacting, and the decode-step buckets (the CUDA-graph path's shapes, run
eagerly here; what a graph would capture, run on the meta device; capture and replay
emulated on a tape of operators)."""
import contextlib
import functools
import random
import time
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model as M
from test_model import QUESTIONS, Scripted, code_writer, qwen2_like


def assert_same(outs, ref):
    """Tokens, masks, text, finish and code calls match exactly; log-probs to 1e-5. (Not bit
    for bit: the matrix-product kernels torch picks depend on the batch shape, so a row stepped
    beside 0 or 5 others can differ in the last bit of its log-probs -- 1 ulp, 1e-6, is the
    largest difference seen here. Tokens come from the row's own stream, so such a difference
    flips a token only if a uniform falls within 1e-6 of a CDF step.)"""
    exact = lambda o: (o.prompt_ids, o.response_ids, o.sampled, o.n_prefix, o.text, o.finish, o.code_calls)
    assert [exact(o) for o in outs] == [exact(o) for o in ref]
    for o, r in zip(outs, ref):
        assert max((abs(x - y) for x, y in zip(o.logprobs, r.logprobs)), default=0) < 1e-5


class Jittery(Scripted):
    """Scripted answers after a random delay: the rows' relative timing changes run to run."""

    def __init__(self, *answers, slow=0.0, seed=0):
        super().__init__(*answers)
        self.slow, self.rng = slow, random.Random(seed)

    def __call__(self, cells):
        time.sleep(self.slow * self.rng.random())
        return super().__call__(cells)


def code_prompts(tok, n):
    prompts = [M.chat_prompt(tok, QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))) for i in range(n)]
    prefixes = [tok("```python\nprint(%d)\n" % i, add_special_tokens=False).input_ids if i % 2 == 0 else []
                for i in range(n)]
    return prompts, prefixes


def test_same_seed_same_rollouts_whatever_the_executor_timing(tiny, tok):
    """Issue 11 item 4. With one shared generator (the old sampler) the rows that step
    together, hence each row's draws, depended on when the sandbox answered. (A bias of 13,
    not 40: rows still write code, and the text between blocks is left to chance.)"""
    lm = code_writer(tiny, tok, strength=13.0)
    prompts, prefixes = code_prompts(tok, 6)
    kw = dict(max_new_tokens=40, temperature=1.0, seed=7, max_code_calls=3)
    fast = M.sample(lm, tok, prompts, prefixes, executor=Scripted("5", "6", "7"), **kw)
    slow = M.sample(lm, tok, prompts, prefixes, executor=Jittery("5", "6", "7", slow=0.15, seed=1), **kw)
    assert sum(len(o.code_calls) for o in fast) >= 4, "the test needs rows that pause on code"
    assert sum(lp < -2 for o in fast for lp in o.logprobs) >= 20, "...and draws left to chance"
    assert_same(slow, fast)
    # ...and the same with a narrower batch, where prompts wait for a free slot
    narrow = M.sample(lm, tok, prompts, prefixes, executor=Jittery("5", "6", "7", slow=0.05, seed=2),
                      batch_size=4, **kw)
    assert_same(narrow, fast)


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu", "gpu-like"])
def test_lockstep_makes_the_forwards_independent_of_the_executor_timing(tiny, tok, monkeypatch, overlap):
    """The rows that share each forward decide the float rounding of every log-prob (see
    assert_same). With lockstep (the default) they are the same whether the sandbox answers at
    once or late, so the log-probs match bit for bit; without it a late answer changes them.
    Both ways lockstep waits: the next turn (CPU), or a turn later with the row sitting one out
    (a device whose forward leaves the CPU free; here the CPU is made to count as one)."""
    monkeypatch.setattr(M, "OVERLAP_ON", {"cpu"} if overlap else set())
    lm = code_writer(tiny, tok, strength=13.0)
    prompts, prefixes = code_prompts(tok, 6)
    kw = dict(max_new_tokens=40, temperature=1.0, seed=7, max_code_calls=3)
    parts = []
    for name in ("prefill", "decode"):
        real = getattr(M._Sampler, name)
        monkeypatch.setattr(M._Sampler, name, lambda self, part, _real=real, _name=name:
                            parts.append((_name, tuple(r.index for r in part))) or _real(self, part))

    def run(executor, lockstep):
        parts.clear()
        outs = M.sample(lm, tok, prompts, prefixes, executor=executor, lockstep=lockstep, **kw)
        return list(parts), outs

    fast, fast_outs = run(Scripted("5", "6", "7"), True)
    slow, slow_outs = run(Jittery("5", "6", "7", slow=0.3, seed=1), True)
    assert sum(len(o.code_calls) for o in fast_outs) >= 4, "the test needs rows that pause on code"
    assert slow == fast
    assert [o.logprobs for o in slow_outs] == [o.logprobs for o in fast_outs]
    free, _ = run(Jittery("5", "6", "7", slow=0.3, seed=1), False)
    assert free != fast                       # a 0.3 s answer lets the other rows step without it
    # ...and with prompts waiting for a slot (continuous batching moves rows between slots)
    kw["batch_size"] = 4
    narrow, narrow_outs = run(Scripted("5", "6", "7"), True)
    late, late_outs = run(Jittery("5", "6", "7", slow=0.1, seed=2), True)
    assert late == narrow and [o.logprobs for o in late_outs] == [o.logprobs for o in narrow_outs]


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu", "gpu-like"])
def test_where_the_forward_leaves_the_cpu_free_code_runs_while_the_other_rows_step(tiny, tok, monkeypatch,
                                                                                    overlap):
    """On a GPU (OVERLAP_ON) a row whose block closed sits out one turn: the other rows take a
    decode step while its execution is pending, so the sandbox's time hides behind a forward
    instead of stalling every row. On a CPU the next turn waits for it first (there the sandbox
    would take the step's cores). Counted on the loop's own schedule, not on a clock: the
    decode steps between an execution's start and its output's insertion. The rollouts are the
    same either way."""
    monkeypatch.setattr(M, "OVERLAP_ON", {"cpu"} if overlap else set())
    lm = code_writer(tiny, tok, strength=13.0)
    prompts, prefixes = code_prompts(tok, 6)
    kw = dict(max_new_tokens=40, temperature=1.0, seed=7, max_code_calls=3)
    steps, pending, between = [0], {}, []
    decode, start_code, insert_output = M._Sampler.decode, M._Sampler.start_code, M._Sampler.insert_output

    def counted(self, part):
        steps[0] += 1
        return decode(self, part)

    def started(self, r, block, newline):
        start_code(self, r, block, newline)
        if r.future is not None:                        # an execution, not the call limit's note
            pending[r.index] = steps[0]

    def inserted(self, r, shown):
        if r.index in pending:
            between.append(steps[0] - pending.pop(r.index))
        return insert_output(self, r, shown)
    for name, fn in (("decode", counted), ("start_code", started), ("insert_output", inserted)):
        monkeypatch.setattr(M._Sampler, name, fn)
    outs = M.sample(lm, tok, prompts, prefixes, executor=Scripted("5", "6", "7"), **kw)
    assert len(between) >= 6, "the test needs rows that pause on code"
    if overlap:
        # one step each, but for an execution started when no other row was left to step
        assert set(between) <= {0, 1} and between.count(1) >= len(between) - 2, between
    else:
        assert set(between) == {0}, between
    monkeypatch.undo()
    assert_same(outs, M.sample(lm, tok, prompts, prefixes, executor=Scripted("5", "6", "7"), **kw))


def test_continuous_batching_keeps_prompt_order_and_results(tiny, tok):
    prompts = [M.chat_prompt(tok, q * (1 + i % 3)) for i, q in enumerate(QUESTIONS * 3)]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    kw = dict(max_new_tokens=12, temperature=1.0, seed=2, code=False)
    wide = M.sample(tiny, tok, prompts, **kw)
    for width in (1, 3, 5):
        narrow = M.sample(tiny, tok, prompts, batch_size=width, **kw)
        assert_same(narrow, wide)
        assert [o.prompt_ids for o in narrow] == prompts
    # rows that end early free their slot for the next prompt: end each row at the first
    # position divisible by 5, i.e. after a number of tokens set by its prompt's length
    outs = M.sample(EosAtMultipleOf5(tiny, eos), tok, prompts, batch_size=4, **kw)
    ends = [next(k for k in range(1, 6) if (len(p) - 2 + k) % 5 == 0) for p in prompts]
    assert [o.n_sampled for o in outs] == ends and len(set(ends)) > 2
    assert all(o.finish == "eos" for o in outs)


def test_freed_slots_are_refilled_together(tiny, tok, monkeypatch):
    """Rows that end at different steps: waiting prompts enter a quarter of the batch at a
    time (one prefill forward for several), not one forward per finished row; the results
    are those of the unbatched run."""
    prompts = [M.chat_prompt(tok, q * (1 + i % 3)) for i, q in enumerate(QUESTIONS * 4)]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    lm, kw = EosAtMultipleOf5(tiny, eos), dict(max_new_tokens=12, temperature=1.0, seed=2, code=False)
    fresh_per_prefill = []
    prefill = M._Sampler.prefill

    def counted(self, part):
        fresh_per_prefill.append(sum(r.length == 0 for r in part))
        return prefill(self, part)
    monkeypatch.setattr(M._Sampler, "prefill", counted)
    outs = M.sample(lm, tok, prompts, batch_size=8, **kw)
    admitted = [n for n in fresh_per_prefill if n]
    assert sum(admitted) == len(prompts)
    assert all(n >= 2 for n in admitted[1:-1]), admitted          # refill = 8 // 4
    assert len(admitted) <= 1 + (len(prompts) - 8) // 2
    monkeypatch.setattr(M._Sampler, "prefill", prefill)
    assert_same(outs, M.sample(lm, tok, prompts, **kw))


def test_an_admitted_prompt_reuses_what_a_decoding_row_holds(tiny, tok, monkeypatch):
    """Prompt B admitted again while the first B is still decoding (the short prompt A beside
    it ended first): it copies B's columns from the cache and runs only its last token, and
    every rollout is what the unbatched run samples."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    lm, kw = EosAtMultipleOf5(tiny, eos), dict(max_new_tokens=12, temperature=1.0, seed=2, code=False)
    chats = [M.chat_prompt(tok, q) for q in QUESTIONS]
    end = lambda p: next(k for k in range(1, 6) if (len(p) - 2 + k) % 5 == 0)   # steps until EOS
    a, b = next((a, b) for a in chats for b in chats if end(a) < end(b))
    fed = {}
    forward = M._Sampler.forward

    def counted(self, part):
        for r in part:
            fed[r.index] = fed.get(r.index, 0) + len(r.feed)
        return forward(self, part)
    monkeypatch.setattr(M._Sampler, "forward", counted)
    outs = M.sample(lm, tok, [a, b, b], batch_size=2, **kw)
    assert fed[2] == 1
    monkeypatch.setattr(M._Sampler, "reuse", lambda self, fresh: None)     # the same without reuse
    fed.clear()
    assert_same(M.sample(lm, tok, [a, b, b], batch_size=2, **kw), outs)
    assert fed[2] == len(b)
    monkeypatch.setattr(M._Sampler, "forward", forward)
    assert_same(outs, M.sample(lm, tok, [a, b, b], **kw))


class EosAtMultipleOf5(torch.nn.Module):
    """Forces <|im_end|> as the next token wherever the current position is a multiple of 5."""

    def __init__(self, inner, eos):
        super().__init__()
        self.inner, self.eos = inner, eos
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, input_ids, position_ids, logits_to_keep=0, **kw):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, **kw)
        last = position_ids[:, -out.logits.shape[1]:]
        out.logits[..., self.eos] += 1e4 * (last % 5 == 0)
        return out


def test_progress_reports_every_sampled_token_and_finished_row(tiny, tok):
    lm = code_writer(tiny, tok)
    prompts, prefixes = code_prompts(tok, 5)
    calls = []
    outs = M.sample(lm, tok, prompts, prefixes, max_new_tokens=15, temperature=1.0, seed=1, batch_size=2,
                    executor=Scripted("1"), progress=lambda new, finished: calls.append((new, finished)))
    assert sum(n for n, _ in calls) == sum(o.n_sampled for o in outs)
    assert sum(f for _, f in calls) == len(prompts)
    assert all(1 <= n <= 2 for n, _ in calls)          # never more tokens than rows in the batch


def test_progress_hears_of_a_row_that_ends_on_its_inserted_output(tiny, tok):
    """A row whose last sampled token closes a code block ends when its output goes in, at the
    start of the next turn, not after a forward; as the last row, no forward followed to report
    it and a bar over rollouts stopped one short."""
    prompts, prefixes = code_prompts(tok, 1)            # "```python\nprint(0)\n": the next token closes it
    calls = []
    outs = M.sample(code_writer(tiny, tok), tok, prompts, prefixes, max_new_tokens=1, greedy=True,
                    executor=Scripted("0"), progress=lambda new, finished: calls.append((new, finished)))
    assert outs[0].finish == "length" and len(outs[0].code_calls) == 1, "the test needs the block closed at the end"
    assert sum(n for n, _ in calls) == 1 and sum(f for _, f in calls) == 1


def test_cache_grows_for_long_outputs(tiny, tok, monkeypatch):
    """An output far longer than the cache's initial estimate: the cache reallocates, to what
    the longest row needs or by a quarter (not doubled: every slot grows with it), and the
    behaviour log-probs still equal teacher-forced ones."""
    grows = []
    grow = M.SlotCache.grow
    monkeypatch.setattr(M.SlotCache, "grow", lambda self, c: grows.append((self.capacity, c)) or grow(self, c))
    lm = code_writer(tiny, tok)
    prompts, prefixes = code_prompts(tok, 2)
    long_output = " ".join(str(i) for i in range(300))
    outs = M.sample(lm, tok, prompts, prefixes, max_new_tokens=20, temperature=1.0, seed=0, max_code_calls=1,
                    max_output_chars=0, executor=Scripted(long_output))
    estimate = max(map(len, prompts)) + len(prefixes[0]) + 20 + 1 * 48
    longest = max(len(p) + len(o.response_ids) for p, o in zip(prompts, outs))
    assert long_output in outs[0].text and len(prompts[0]) + len(outs[0].response_ids) > estimate
    assert grows and all(new <= max(longest, old * 5 // 4) for old, new in grows), grows
    tf = M.sequence_logprobs(lm, prompts, [o.response_ids for o in outs])
    for o, lp in zip(outs, tf):
        s = torch.tensor(o.sampled)
        assert torch.allclose(lp.detach()[s], torch.tensor(o.logprobs)[s], atol=1e-4)


def test_decode_buckets():
    assert M._buckets(1) == [1]
    assert M._buckets(6) == [1, 2, 4, 6]
    assert M._buckets(32) == [1, 2, 4, 8, 16, 32]


class HostTensors(TorchDispatchMode):
    """Records every operator that is handed a tensor living on the CPU (0-dim scalars aside:
    those a CUDA kernel takes by value)."""

    def __init__(self):
        super().__init__()
        self.ops, self.seen = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.seen += [str(func) for a in tree_leaves((args, kwargs or {}))
                      if isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("greedy", [True, False])
def test_the_captured_decode_step_neither_syncs_nor_reads_host_memory(tok, arch, greedy):
    """What a CUDA graph captures (`_DecodeStep._forward` at the full cache width), run on the
    `meta` device: a host sync in it (`.item()`, `.tolist()`, `bool(t)`, a boolean-mask index)
    raises on meta as it breaks a capture on a GPU, and a tensor built on the CPU inside it (an
    `arange` without a device) would be a host copy the graph cannot replay: meta refuses to
    mix it in, and an index tensor (which meta accepts from the CPU) is caught by the guard.
    Mutations seen to fail it: a device-less arange in `_attention_mask` or in `SlotCache.plan`,
    a `float()` in `_draw`, a boolean-mask index in the step."""
    net = (M.tiny_model(tok) if arch == "llama" else qwen2_like(tok)).to(torch.bfloat16).to("meta")
    w, capacity, prompt = 4, 16, 3
    cache = M.SlotCache(w, capacity)
    pos = torch.arange(prompt, device="meta").expand(w, prompt)
    cache.plan(torch.arange(w, device="meta"), pos, prompt)      # a prefill allocates the cache
    with torch.no_grad():
        net(input_ids=torch.zeros(w, prompt, dtype=torch.long, device="meta"), position_ids=pos,
            attention_mask=M._attention_mask(pos, None, prompt, torch.bfloat16), cache=cache, use_cache=True)
    draw = functools.partial(M._draw, greedy=greedy, temperature=0.7, top_k=20, top_p=0.9)
    step = M._DecodeStep(net, cache, w, draw, graphs=True)
    guard = HostTensors()
    with torch.no_grad(), guard:
        out = step._forward(w, cache.capacity)
    assert out.is_meta and out.shape == (2, w)
    assert guard.ops > 50 and guard.seen == []


class Tape(TorchDispatchMode):
    """A CUDA graph's contract, on a CPU: capture records every operator with the tensors it
    read and wrote; replay runs them again on those same tensors. A step that hands the graph a
    fresh input tensor, or replays after the cache it captured was reallocated, reads stale
    memory here as it would on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.replays = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out

    def replay(self):
        self.replays += 1
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(old, torch.Tensor) and old is not fresh:
                    old.copy_(fresh)                 # a graph writes into the captured outputs


def test_the_cuda_graph_path_replayed_on_a_tape_samples_what_the_eager_step_does(tiny, tok, monkeypatch):
    """The sampler with its decode step on (emulated) CUDA graphs: one per batch-width bucket,
    captured again when the cache grows, replayed on the full cache width. Code rows, a long
    output that grows the cache, more prompts than slots: the rollouts are the eager ones.
    Mutations seen to fail it: no recapture after the cache grows; a fresh input tensor per step."""
    lm = code_writer(tiny, tok)
    prompts, prefixes = code_prompts(tok, 5)
    long_output = " ".join(str(i) for i in range(300))
    kw = dict(max_new_tokens=20, temperature=1.0, seed=0, max_code_calls=2, batch_size=3)
    eager = M.sample(lm, tok, prompts, prefixes, executor=Scripted("7", long_output), **kw)
    tapes, stream = [], SimpleNamespace(wait_stream=lambda other: None)
    for name, fake in (("Stream", lambda: stream), ("current_stream", lambda: stream),
                       ("stream", lambda s: contextlib.nullcontext()), ("graph", lambda tape: tape),
                       ("CUDAGraph", lambda: tapes.append(Tape()) or tapes[-1])):
        monkeypatch.setattr(torch.cuda, name, fake, raising=False)
    Step = M._DecodeStep
    monkeypatch.setattr(M, "_DecodeStep", lambda model, cache, width, draw, graphs: Step(model, cache, width, draw, True))
    grows = []
    grow = M.SlotCache.grow
    monkeypatch.setattr(M.SlotCache, "grow", lambda self, c: grows.append(c) or grow(self, c))
    graphed = M.sample(lm, tok, prompts, prefixes, executor=Scripted("7", long_output), **kw)
    assert_same(graphed, eager)
    assert grows and len(tapes) > len(M._buckets(3)), "a capture per bucket, and again after growing"
    assert sum(t.replays for t in tapes) >= 20 and all(len(t.ops) > 50 for t in tapes)


def test_slot_cache_move_and_grow(monkeypatch):
    trims = []
    monkeypatch.setattr(M, "release_freed_memory", lambda: trims.append(1))
    cache = M.SlotCache(slots=3, capacity=4)
    keys = torch.arange(3 * 2 * 4 * 1, dtype=torch.float32).reshape(3, 2, 4, 1)
    cache.plan(slice(0, 3), torch.arange(4).expand(3, 4), 4)
    k, _ = cache.update(keys, -keys, 0)
    assert torch.equal(k, keys)
    cache.move(2, 0, 3)
    assert torch.equal(cache.k[0][0, :, :3], keys[2, :, :3]) and torch.equal(cache.k[0][0, :, 3], keys[0, :, 3])
    cache.grow(9)
    assert cache.k[0].shape == (3, 2, 10, 1) and torch.equal(cache.v[0][1, :, :4], -keys[1])
    assert len(trims) == 2          # each old buffer (k and v of the one layer) handed back before the next
    # a sub-batch forward: slot 1 only, two tokens at columns 4 and 5, reading 6 columns
    cache.plan(torch.tensor([1]), torch.tensor([[4, 5]]), 6)
    k, v = cache.update(torch.ones(1, 2, 2, 1), torch.ones(1, 2, 2, 1), 0)
    assert k.shape == (1, 2, 6, 1) and torch.equal(k[0, :, :4], keys[1]) and bool((k[0, :, 4:] == 1).all())


def test_uniform_noise_is_uniform_and_draws_follow_the_distribution():
    keys = torch.tensor([M._row_key(0, i) for i in range(20000)])
    u = M._uniform(keys, torch.zeros_like(keys))
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u, M._uniform(keys, torch.ones_like(keys)))
    assert M._row_key(0, 3) != M._row_key(1, 3) and M._row_key(0, 3) == M._row_key(0, 3)
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0, 0.5]]).expand(len(keys), 5)
    token, logp = M._draw(logits, keys, torch.zeros_like(keys), False, 1.0, 0, 1.0)
    freq = torch.bincount(token, minlength=5).float() / len(keys)
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)
    assert torch.allclose(logp, logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1))
    # top-k 2 never draws outside the two largest logits
    token, _ = M._draw(logits, keys, torch.zeros_like(keys), False, 1.0, 2, 1.0)
    assert set(token.tolist()) == {1, 2}


def unmix32(x):
    """The inverse of model._mix32 (each xorshift by 16 undoes itself; each product by an odd
    number is undone by its inverse modulo 2**32)."""
    for mult in (0x5BD1E995, 0x68E31DA5, 0x7FEB352D):
        x = x ^ (x >> 16)
        x = (x * pow(mult, -1, 2 ** 32)) & M.M32
    return x ^ (x >> 16)


def test_uniform_noise_stays_inside_the_open_interval_at_its_ends():
    """The key whose hash is the largest: (2**24 - 1 + 0.5) / 2**24 in float32 rounded to 1.0,
    a uniform outside (0, 1) once in 2**24 draws."""
    c = M._mix32(0)
    assert unmix32(M._mix32(12345)) == 12345
    ends = torch.tensor([unmix32(0xFFFFFFFF) ^ c, unmix32(0) ^ c])
    u = M._uniform(ends, torch.zeros_like(ends))
    assert 1 - float(u[0]) == 2.0 ** -25 and float(u[1]) == 2.0 ** -25
