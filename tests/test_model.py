"""The sampler against transformers' generate, behaviour vs teacher-forced log-probs, and
code interleaving with a scripted executor."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model as M

QUESTIONS = ["What is 2+2?", "Compute the sum of the first hundred primes, then explain why.", "Hi",
             "A train leaves at 3pm going 60 mph; when does it arrive 150 miles away?"]


class Bigram(torch.nn.Module):
    """Wraps a model and adds `strength` to the logit of b whenever the input token is a:
    a deterministic way to make a random model write ```python blocks. Applied at every
    position, so sampling and teacher forcing see the same distribution."""

    def __init__(self, inner, pairs, strength=40.0):
        super().__init__()
        self.inner, self.pairs, self.strength = inner, pairs, strength
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, input_ids, logits_to_keep=0, **kw):
        out = self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)
        kept = logits_to_keep if torch.is_tensor(logits_to_keep) else slice(-out.logits.shape[1], None)
        last = input_ids[:, kept]                  # the input token at each position kept
        for a, b in self.pairs:
            out.logits[..., b] += self.strength * (last == a)
        return out


def code_writer(tiny, tok, strength=40.0):
    t = lambda s: tok(s, add_special_tokens=False).input_ids
    [nl], [ticks], [py] = t("\n"), t("```"), t("python")
    return Bigram(tiny, [(nl, ticks), (ticks, py), (py, nl)], strength=strength)


class Scripted:
    """An executor that records the cells it is given and answers from a script: a row's k-th
    call (k cells, notebook semantics) gets the k-th answer, whatever the other rows do."""

    def __init__(self, *answers):
        self.calls, self.answers = [], list(answers)

    def __call__(self, cells):
        self.calls.append(list(cells))
        out = self.answers[min(len(cells), len(self.answers)) - 1]
        return SimpleNamespace(output=out, ok=True, error=None)


def test_greedy_matches_generate_batched(tiny, tok):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1, "prompts must differ in length"
    outs = M.sample(tiny, tok, prompts, max_new_tokens=24, greedy=True, code=False)
    ids, mask = M.left_pad(prompts, tok.pad_token_id)
    ref = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    for i, o in enumerate(outs):
        expect = ref[i, ids.shape[1]:].tolist()[:len(o.response_ids)]
        assert o.response_ids == expect
        assert len(o.response_ids) == 24 or o.finish == "eos"


def test_batch_of_one_matches_generate(tiny, tok):
    p = M.chat_prompt(tok, QUESTIONS[1])
    [o] = M.sample(tiny, tok, [p], max_new_tokens=16, greedy=True, code=False)
    ref = tiny.generate(input_ids=torch.tensor([p]), max_new_tokens=16, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    assert o.response_ids == ref[0, len(p):].tolist()[:len(o.response_ids)]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0)])
def test_behaviour_logprobs_equal_teacher_forced(tiny, tok, temperature, top_k, top_p):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    outs = M.sample(tiny, tok, prompts, max_new_tokens=20, temperature=temperature, seed=3, code=False)
    tf = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs], temperature=temperature)
    for o, lp in zip(outs, tf):
        assert torch.allclose(lp, torch.tensor(o.logprobs), atol=1e-4)


def test_top_k_top_p_restrict_the_support(tiny, tok):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    a = M.sample(tiny, tok, prompts, max_new_tokens=12, top_k=1, seed=1, code=False)
    g = M.sample(tiny, tok, prompts, max_new_tokens=12, greedy=True, code=False)
    assert [o.response_ids for o in a] == [o.response_ids for o in g]      # top-k 1 is greedy
    assert all(abs(x) < 1e-6 for o in a for x in o.logprobs)              # ...a point mass
    p = M.sample(tiny, tok, prompts, max_new_tokens=12, top_p=0.5, seed=1, code=False)
    full = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in p])
    for o, lp in zip(p, full):   # renormalised over the nucleus: never below the full log-prob
        assert all(b >= f - 1e-5 for b, f in zip(o.logprobs, lp.tolist()))


def test_seed_reproducible(tiny, tok):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    a = M.sample(tiny, tok, prompts, max_new_tokens=10, seed=5, code=False)
    b = M.sample(tiny, tok, prompts, max_new_tokens=10, seed=5, code=False)
    c = M.sample(tiny, tok, prompts, max_new_tokens=10, seed=6, code=False)
    assert [o.response_ids for o in a] == [o.response_ids for o in b]
    assert [o.response_ids for o in a] != [o.response_ids for o in c]


def test_stop_string_eos_and_max_tokens(tiny, tok):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    free = M.sample(tiny, tok, prompts, max_new_tokens=30, greedy=True, code=False, ignore_eos=True)
    assert all(o.finish == "length" and o.n_sampled == 30 for o in free)
    # stop string: the text of the 5th sampled token of row 0
    stop = tok.decode(free[0].response_ids[4:5])
    [o] = M.sample(tiny, tok, prompts[:1], max_new_tokens=30, greedy=True, code=False, stop=[stop])
    assert o.finish == "stop" and stop in o.text and len(o.response_ids) <= 5
    # EOS: wrap the model so <|im_end|> wins after 6 tokens' worth of any token
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    first = free[1].response_ids[2]
    forced = Bigram(tiny, [(first, eos)], strength=1e4)
    [o] = M.sample(forced, tok, prompts[1:2], max_new_tokens=30, greedy=True, code=False)
    assert o.finish == "eos" and o.response_ids[-1] == eos and o.response_ids[:3] == free[1].response_ids[:3]


def test_a_stop_string_in_an_inserted_output_stops_nothing(tiny, tok):
    """The code prints the stop string; the model then writes a token that could end one
    (":"). The old check decoded the last tokens whatever wrote them and ended the row there."""
    t = lambda s: tok(s, add_special_tokens=False).input_ids
    [nl], [ticks], [colon] = t("\n"), t("```"), t(":")
    lm = Bigram(tiny, [(nl, ticks), (ticks, colon)])            # "\n" -> "```" -> ":"
    prompt, prefix = M.chat_prompt(tok, "What is 2+2?"), t("```python\nprint(1)\n")
    printed = SimpleNamespace(output="Question: 5", ok=True, error=None)
    [o] = M.sample(lm, tok, [prompt], [prefix], max_new_tokens=4, greedy=True, stop=["\nQuestion:"],
                   executor=lambda cells: printed, max_code_calls=1, ignore_eos=True)
    assert "```output\nQuestion: 5\n```\n```:" in o.text, o.text     # the output, then the model's ":"
    assert o.finish == "length" and o.n_sampled == 4
    # ...while a ":" that does complete it stops the row: the stop string's opening as the prefix
    [o] = M.sample(lm, tok, [prompt], [t("\nQuestion```")], max_new_tokens=4, greedy=True, stop=["Question```:"],
                   code=False)
    assert o.finish == "stop" and o.n_sampled == 1 and o.text.endswith("Question```:")


def test_completes_stop_counts_only_text_the_last_token_adds(tok):
    ids = lambda *pieces: [tok(p, add_special_tokens=False).input_ids[0] for p in pieces]
    assert M.completes_stop(tok, ["=="], ids("x", "=", "="))
    assert M.completes_stop(tok, ["=="], ids("x", "=", "=", "="))     # overlaps the "==" before it
    assert not M.completes_stop(tok, ["=="], ids("=", "=", "x"))      # there already: not this token's
    assert not M.completes_stop(tok, ["=="], ids("=", "x", "="))
    arrow = tok("x⟹", add_special_tokens=False).input_ids              # "⟹" is three byte tokens here
    assert len(arrow) == 4 and "\ufffd" in tok.decode(arrow[:-1])
    assert M.completes_stop(tok, ["⟹"], arrow)                         # its last byte completes it
    assert not M.completes_stop(tok, ["⟹"], arrow[:-1])


@pytest.mark.parametrize("word", ["質問：", "問題：", "문제:"])
def test_a_stop_string_of_many_byte_tokens_is_seen(tiny, tok, word):
    """A byte-level vocabulary spells a rare non-ASCII character as several tokens: the window
    the stop check decodes must count the string's bytes, not its characters."""
    script = tok("7 " + word, add_special_tokens=False).input_ids
    prompt = M.chat_prompt(tok, "What is 3 + 4?")
    chain = [prompt[-1]] + script
    assert len(set(chain)) == len(chain), "the scripted tokens must be distinct for the bigram chain"
    assert len(script) - 1 > len(word) + 2, "the test needs a word spelled in more tokens than characters + 2"
    lm = Bigram(tiny, list(zip(chain, chain[1:])), strength=1e4)
    [o] = M.sample(lm, tok, [prompt], max_new_tokens=len(script) + 3, greedy=True, code=False, ignore_eos=True,
                   stop=[word])
    assert o.finish == "stop" and o.text == "7 " + word, o.text


def test_sample_refuses_mismatched_prefixes_and_an_empty_budget(tiny, tok):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS[:3]]
    with pytest.raises(ValueError, match="1 prefixes for 3 prompts"):
        M.sample(tiny, tok, prompts, [[]], max_new_tokens=2)      # zip would have dropped two rows
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.sample(tiny, tok, prompts, max_new_tokens=0)             # one token was sampled anyway


def test_sample_refuses_a_prefix_that_closes_a_code_block(tiny, tok):
    """The block would run only when the model next wrote a backtick, its output inserted
    there. Without code, or with the block left open, the prefix is fine."""
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS[:2]]
    closed = tok("```python\nprint(1)\n```\nSo", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="prefix 1 closes a ```python block"):
        M.sample(tiny, tok, prompts, [[], closed], max_new_tokens=2)
    assert len(M.sample(tiny, tok, prompts, [[], closed], max_new_tokens=2, code=False)) == 2
    assert len(M.sample(tiny, tok, prompts, [[], closed[:-3]], max_new_tokens=2)) == 2


def test_the_timeout_note_survives_the_call_limit(tiny, tok):
    """A block times out (its state is reset, and the next output says so); the next block is
    past the call limit: its output is the limit message, and the note still goes first."""
    timeout = SimpleNamespace(output="", ok=False, error="Timeout after 1 s")
    prefix = tok("```python\nwhile True: pass\n", add_special_tokens=False).input_ids
    [o] = M.sample(code_writer(tiny, tok), tok, [M.chat_prompt(tok, "Hi")], [prefix], max_new_tokens=12,
                   greedy=True, executor=lambda cells: timeout, max_code_calls=1)
    assert len(o.code_calls) == 1 and o.code_calls[0]["error"].startswith("Timeout")
    assert "```output\n(the previous block timed out; its state was reset)\nReach max function call limit.\n```" \
        in o.text, o.text


def test_plain_text_prompts_stop_at_the_next_question(tiny, tok):
    """Without a chat template chat_prompt writes "Question: ...\nAnswer: " turns, and a base
    model answers and then invents the next turn, boxed answer and all; the grader then read
    that one. sample stops at "\nQuestion:" there by default; with a template it does not."""
    import copy
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    prompt = M.chat_prompt(plain, "What is 3 + 4?")
    assert plain.decode(prompt).endswith("Answer: ")
    script = plain("\\boxed{7}\nQuestion: Why nine", add_special_tokens=False).input_ids   # distinct tokens
    chain = [prompt[-1]] + script
    assert len(set(chain)) == len(chain), "the scripted tokens must be distinct for the bigram chain"
    lm = Bigram(tiny, list(zip(chain, chain[1:])), strength=1e4)
    [o] = M.sample(lm, plain, [prompt], max_new_tokens=len(script), greedy=True, code=False, ignore_eos=True)
    assert o.finish == "stop" and o.text == "\\boxed{7}\nQuestion:", o.text
    [o] = M.sample(lm, tok, [M.chat_prompt(tok, "What is 3 + 4?")[:-1] + [prompt[-1]]], max_new_tokens=len(script),
                   greedy=True, code=False, ignore_eos=True)
    assert o.finish == "length" and o.text.endswith("Why nine"), o.text     # a chat template: no default stop


def test_forced_prefix_is_fed_and_masked(tiny, tok):
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS[:2]]
    prefix = tok("Let's think step by step.", add_special_tokens=False).input_ids
    outs = M.sample(tiny, tok, prompts, [prefix, []], max_new_tokens=8, greedy=True, code=False)
    assert outs[0].response_ids[:len(prefix)] == prefix and outs[0].n_prefix == len(prefix)
    assert outs[0].sampled == [False] * len(prefix) + [True] * 8
    # the same as generate continuing from prompt + prefix
    ref = tiny.generate(input_ids=torch.tensor([prompts[0] + prefix]), max_new_tokens=8, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    assert outs[0].response_ids[len(prefix):] == ref[0, len(prompts[0]) + len(prefix):].tolist()


def test_the_lm_head_only_sees_contiguous_rows(tiny, tok):
    """Prefill (prompts of different lengths, a forced prefix, a shared demonstration) and
    teacher forcing keep the LM head's input contiguous: a strided one makes the linear layer
    copy the head's weight once per row (M.last_positions)."""
    seen = []
    hook = tiny.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    try:
        demo = M.chat_prompt(tok, "What is 1+1?")
        prompts = [demo + tok(q, add_special_tokens=False).input_ids for q in ("Hi.", "What is 2 + 3 times 4?", "7?")]
        prefix = tok("Let's see.", add_special_tokens=False).input_ids
        outs = M.sample(tiny, tok, prompts, [prefix] * 3, max_new_tokens=3, seed=0, code=False)
        M.sequence_logprobs(tiny, [o.prompt_ids for o in outs], [o.response_ids for o in outs])
    finally:
        hook.remove()
    assert len(seen) > 3 and all(seen)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("share", ["nothing", "an opening", "whole prompts"])
def test_teacher_forcing_matches_a_full_log_softmax_in_value_and_gradient(tiny, tok, temperature, share):
    """sequence_logprobs (one packed row behind the prompts' shared opening, log-softmax on the
    positions predicting a response token only, `chunk` at a time, recomputed in backward)
    against the plain computation: each sequence alone, every position's logits, one
    log_softmax, a gather. Prompts that share nothing, a few-shot opening, or everything (the
    opening must stop a token short: that token predicts each response's first); responses of
    very different lengths (one empty) and a chunk smaller than the tokens."""
    questions = {"nothing": ("Hi.", "What is 2 + 3 times 4?", "7?"), "an opening": ("Q: 1+1? A: 2. Q: Hi.",
                 "Q: 1+1? A: 2. Q: What is 2 + 3 times 4?", "Q: 1+1? A: 2. Q: 7?"), "whole prompts": ("What is 7?",) * 3}
    prompts = [tok(q, add_special_tokens=False).input_ids for q in questions[share]]
    responses = [tok(r, add_special_tokens=False).input_ids for r in ("Fourteen, since 3 * 4 = 12 and 2 + 12 = 14.", "", "Eight.")]
    alone = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    assert (M.packed_length(prompts, responses) < alone) == (share != "nothing")
    tiny.zero_grad(set_to_none=True)
    got = M.sequence_logprobs(tiny, prompts, responses, temperature, chunk=5)
    sum(lp.sum() * (i + 1) for i, lp in enumerate(got)).backward()
    grad = torch.cat([p.grad.flatten() for p in tiny.parameters()])
    tiny.zero_grad(set_to_none=True)
    want = []
    for p, r in zip(prompts, responses):                       # one sequence at a time, no padding
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(tiny(input_ids=ids).logits[0, len(p) - 1:-1].float() / temperature, -1)
        want.append(logp.gather(1, torch.tensor(r, dtype=torch.long)[:, None]).squeeze(1))
    sum(lp.sum() * (i + 1) for i, lp in enumerate(want)).backward()
    ref = torch.cat([p.grad.flatten() for p in tiny.parameters()])
    tiny.zero_grad(set_to_none=True)
    assert [len(g) for g in got] == [len(r) for r in responses]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4), (g, w)
    assert ref.abs().max() > 0 and torch.allclose(grad, ref, atol=1e-5, rtol=1e-3)


def test_teacher_forcing_computes_a_shared_opening_once_and_takes_eager_attention(tok):
    """The packed row holds the shared opening once (model.packed_length, what --micro-tokens
    counts), and eager attention, which adds its mask rather than selecting with it, gives the
    same log-probs as sdpa."""
    model = M.tiny_model(tok, seed=1).eval()
    demo = M.chat_prompt(tok, "What is 1+1?") + tok("2", add_special_tokens=False).input_ids
    prompts = [demo + tok(q, add_special_tokens=False).input_ids for q in ("Hi.", "What is 2 + 3 times 4?")]
    responses = [tok(r, add_special_tokens=False).input_ids for r in ("Hello.", "14")]
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        sdpa = M.sequence_logprobs(model, prompts, responses)
        model.set_attn_implementation("eager")
        eager = M.sequence_logprobs(model, prompts, responses)
    hook.remove()
    assert seen == [M.packed_length(prompts, responses)] * 2
    assert seen[0] <= len(demo) + sum(len(p) - len(demo) + len(r) for p, r in zip(prompts, responses))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sdpa, eager))


def test_teacher_forcing_refuses_an_attention_that_ignores_its_mask(tok):
    """Flash attention takes no 4-d mask: the packed sequences would see each other; a sliding
    window would not apply."""
    model = M.tiny_model(tok, seed=1).eval()
    model.config._attn_implementation = "flash_attention_2"     # set directly: no flash-attn package here
    with pytest.raises(ValueError, match="sdpa"):
        M.sequence_logprobs(model, [[1, 2, 3], [1, 2, 4]], [[5], [6]])
    model.config._attn_implementation, model.config.use_sliding_window = "sdpa", True
    with pytest.raises(ValueError, match="sliding window"):
        M.sequence_logprobs(model, [[1, 2, 3], [1, 2, 4]], [[5], [6]])


def test_teacher_forcing_under_activation_checkpointing_asks_for_no_cache(tok):
    """The M-step's forward (training mode, activation checkpointing) wants no KV cache: asked
    for one, transformers drops it and prints a warning into the M-step's progress bar."""
    import logging
    model = M.tiny_model(tok, seed=0).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        logging.Logger.warning_once.cache_clear()              # transformers warns once a process
        prompts = [tok("What is 2 + 2?", add_special_tokens=False).input_ids]
        M.sequence_logprobs(model, prompts, [tok(" 4", add_special_tokens=False).input_ids])[0].sum().backward()
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "use_cache" in m], seen


def test_teacher_forcing_follows_the_logits_device_not_the_parameters(tiny, tok):
    """Under FSDP's --cpu-offload the parameters sit on the CPU and the forward runs on the GPU:
    the tensors built after the forward must go where its logits are. Here the logits come back
    on `meta` while the parameters stay on the CPU; a target left on the CPU fails the gather."""
    class Offloaded(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            return SimpleNamespace(logits=self.inner(**kwargs).logits.to("meta"))
    class Mixed(TorchDispatchMode):          # meta takes CPU operands silently; a GPU would not
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            where = {a.device.type for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor) and a.dim()}
            self.seen += [str(func)] if where == {"cpu", "meta"} else []
            return func(*args, **(kwargs or {}))
    prompts = [tok(q, add_special_tokens=False).input_ids for q in ("Hi.", "What is 2 + 3?")]
    responses = [tok(r, add_special_tokens=False).input_ids for r in ("Five.", "It is 5.")]
    with torch.no_grad(), Mixed() as guard:
        got = M.sequence_logprobs(Offloaded(tiny), prompts, responses)
    assert [g.device.type for g in got] == ["meta", "meta"] and [len(g) for g in got] == [len(r) for r in responses]
    assert guard.seen == []


def test_code_block_runs_output_is_inserted_and_masked(tiny, tok):
    lm = code_writer(tiny, tok)
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS[:3]]
    prefix = tok("```python\nx = 5\nprint(x)\n", add_special_tokens=False).input_ids
    ex = Scripted("5", "6", "7")
    outs = M.sample(lm, tok, prompts, [prefix, [], []], max_new_tokens=40, temperature=1.0, seed=0,
                    executor=ex, max_code_calls=2)
    o = outs[0]
    assert "```output\n5\n```" in o.text
    assert [c["output"] for c in o.code_calls] == ["5", "6"]                   # call limit 2
    assert "Reach max function call limit." in o.text
    assert o.code_calls[0]["code"] == "x = 5\nprint(x)\n"
    # the second block was run with the first block's code before it (notebook state)
    mine = [c for c in ex.calls if c[0] == "x = 5\nprint(x)\n"]
    assert len(mine) == 2 and len(mine[1]) == 2
    # the first run of inserted tokens after the prefix is exactly the output block
    start = o.sampled.index(True)
    start = o.sampled.index(False, start)
    end = o.sampled.index(True, start)
    assert tok.decode(o.response_ids[start:end]) == "\n```output\n5\n```\n"
    assert tok.decode(o.response_ids[start - 1:start]) == "```" and o.sampled[start - 1]
    # behaviour log-probs still equal teacher-forced ones after the insertions
    tf = M.sequence_logprobs(lm, prompts, [x.response_ids for x in outs])
    for x, lp in zip(outs, tf):
        s = torch.tensor(x.sampled)
        assert torch.allclose(lp[s], torch.tensor(x.logprobs)[s], atol=1e-4)
        assert all(v == 0.0 for v, m in zip(x.logprobs, x.sampled) if not m)


def test_other_rows_decode_while_one_waits(tiny, tok):
    """A slow execution in row 0 does not change what row 1 samples."""
    import time

    class Slow(Scripted):
        def __call__(self, cells):
            time.sleep(0.3)
            return super().__call__(cells)

    lm = code_writer(tiny, tok)
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS[:2]]
    prefix = tok("```python\nprint(1)\n", add_special_tokens=False).input_ids
    both = M.sample(lm, tok, prompts, [prefix, []], max_new_tokens=30, greedy=True, executor=Slow("1"))
    alone = M.sample(lm, tok, prompts[1:], max_new_tokens=30, greedy=True, executor=Scripted("1"))
    assert both[1].response_ids == alone[0].response_ids


def test_missing_model_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        M.load_model(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert msg.startswith("error: could not load model: no directory") and "\n" not in msg


def test_short_names_resolve_to_hub_ids(tmp_path):
    assert M.resolve_name("Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert M.resolve_name("Qwen2.5-Math-1.5B-Instruct") == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert M.resolve_name("org/model") == "org/model"
    assert M.resolve_name(str(tmp_path)) == str(tmp_path)


def qwen2_like(tok, dtype=torch.float32):
    """A random two-layer Qwen2 (q/k/v biases, grouped-query attention: 6 heads on 2)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024)
    return Qwen2ForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_linears_change_rounding_only_and_leave_the_model_as_it_was(tiny, tok, arch):
    net = tiny if arch == "llama" else qwen2_like(tok)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    ids, mask = M.left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        before = net(input_ids=ids, attention_mask=mask).logits
        with M.packed_linears(net, len(prompts)) as k:
            assert k.on and all("forward" in m.__dict__ for m in linears)
            packed = [m.forward for m in linears]
            inside = net(input_ids=ids, attention_mask=mask).logits
            # a sample() inside (a caller packing once for many calls) leaves the outer packing be
            M.sample(net, tok, prompts[:2], max_new_tokens=3, code=False)
            assert [m.forward for m in linears] == packed
        after = net(input_ids=ids, attention_mask=mask).logits
    assert not any("forward" in m.__dict__ for m in net.modules())
    assert torch.equal(before, after) and torch.allclose(inside, before, atol=1e-4)


def test_sampling_on_packed_weights_follows_the_weights_and_matches_plain_weights(tok):
    net = M.tiny_model(tok, seed=0).eval()           # a copy of `tiny`: this test changes its weights
    writer = code_writer(net, tok)
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    prefix = tok("```python\nx = 5\nprint(x)\n", add_special_tokens=False).input_ids
    kw = dict(max_new_tokens=30, seed=2, executor=Scripted("4\n", "5\n"))
    seen = []
    for step in range(2):
        fast = M.sample(writer, tok, prompts, [prefix, [], [], []], **kw)
        plain = M.sample(writer, tok, prompts, [prefix, [], [], []], pack_weights=False, **kw)
        assert [o.response_ids for o in fast] == [o.response_ids for o in plain]
        assert all(o.code_calls for o in fast)
        for a, b in zip(fast, plain):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        seen.append([x for o in fast for x in o.logprobs])
        with torch.no_grad():      # a training step between two samples: the next one must see it
            net.lm_head.weight.add_(torch.randn_like(net.lm_head.weight))
    # the weights moved the log-probs by more than ten times what the kernels may differ by, so
    # stale packed weights would have failed the comparison with plain weights above
    assert max(abs(x - y) for x, y in zip(*seen)) > 1e-3


def test_packed_linears_sample_a_bf16_model_and_stand_aside_where_they_cannot_apply(tok):
    net = qwen2_like(tok, torch.bfloat16)
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    outs = M.sample(net, tok, prompts, max_new_tokens=12, seed=0, code=False)
    tf = M.sequence_logprobs(net, prompts, [o.response_ids for o in outs])
    for o, lp in zip(outs, tf):           # behaviour log-probs within bf16 noise of teacher forcing
        assert len(o.response_ids) == 12 or o.finish == "eos"
        assert (lp.float() - torch.tensor(o.logprobs)).abs().max() < 0.25
    assert not M.packed_linears(net, 4, enabled=False).on
    assert not M.packed_linears(net.half(), 4).on                       # no fp16 oneDNN path here

    class FSDPLlamaForCausalLM(torch.nn.Module):     # the class name FSDP2's fully_shard gives a model
        pass
    wrapped = FSDPLlamaForCausalLM()
    wrapped.inner = M.tiny_model(tok)
    with M.packed_linears(wrapped, 4) as k:
        assert not k.on and not any("forward" in m.__dict__ for m in wrapped.modules())


@pytest.mark.parametrize("fast", [True, False])
def test_pick_dtype_says_when_bf16_would_be_slow(monkeypatch, capsys, fast):
    """auto resolves to bf16 only where its products are fast; an explicit bf16 is kept but, on a
    CPU without native bf16 instructions, one line says it is ~50x slower; fp32 is never questioned.
    load_model goes through it, so evaluate/explore/bench warn as em_train does."""
    monkeypatch.setattr(M, "fast_bf16", lambda device: fast)
    assert M.pick_dtype("auto", "cpu") == ("bf16" if fast else "fp32")
    assert ("--dtype auto: fp32" in capsys.readouterr().err) is not fast
    assert M.pick_dtype("bf16", "cpu") == "bf16"
    assert ("~50x slower" in capsys.readouterr().err) is not fast
    assert M.pick_dtype("fp32", "cpu") == "fp32" and capsys.readouterr().err == ""
    model, _ = M.load_model("tiny", "bf16", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert ("~50x slower" in capsys.readouterr().err) is not fast


def test_fast_bf16_needs_native_bf16_instructions_and_onednn(monkeypatch):
    """A CPU is fast in bf16 with AVX512_BF16 or AMX under oneDNN; plain AVX-512 (emulated
    bf16), AVX2, or a build without oneDNN's bf16 kernels is not."""
    cases = [  # avx512_bf16, amx, onednn bf16 kernels, onednn, fast
        (True, False, True, True, True), (False, True, True, True, True), (False, False, True, True, False),
        (True, True, False, True, False), (True, True, True, False, False)]
    for avx512_bf16, amx, kernels, mkldnn, want in cases:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=kernels: v, raising=False)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda v=mkldnn: v)
        assert M.fast_bf16("cpu") is want and M.fast_bf16(torch.device("cpu")) is want


def test_fast_bf16_on_cuda_asks_the_named_gpu_for_ampere_or_newer(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4, where bf16 is emulated; auto must
    not pick it there. The GPU asked is the one named (cuda:1), else the current one."""
    caps = {0: (7, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert [M.fast_bf16(d) for d in ("cuda", "cuda:0", "cuda:1", torch.device("cuda", 2))] == [False, False, True, True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.fast_bf16("cuda:1") is False
