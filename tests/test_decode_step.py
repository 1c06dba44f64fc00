"""decode_forward, the decoder written out for sample(compile=True): the same logits as
transformers' forward on the same cache, for both model types it implements; the compiled
sampler against the default one; one compilation reused across widths and model copies."""
import copy
import shutil

import pytest
import torch

import model as M

QUESTIONS = ["What is 2+2?", "Compute the sum of the first hundred primes, then explain why.", "Hi"]


def qwen2_tiny(tok):
    """A random two-layer Qwen2 (biases on q, k, v) over the real tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():              # random init leaves the biases at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def prefilled(model, prompts, capacity=64):
    """A SlotCache holding each prompt in its own slot, filled by transformers' forward."""
    cache = M.SlotCache(len(prompts), capacity)
    ids, mask = M.left_pad(prompts, 0)
    pad = ids.shape[1] - torch.tensor([len(p) for p in prompts])[:, None]
    pos = (torch.arange(ids.shape[1]) - pad).clamp(min=0)
    real = mask.bool()
    cache.plan(slice(0, len(prompts)), pos.masked_fill(~real, capacity), ids.shape[1])
    model(input_ids=ids, position_ids=pos, attention_mask=M._attention_mask(pos, real, ids.shape[1], torch.float32),
          cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_decode_forward_matches_transformers_on_the_same_cache(tiny, tok, kind):
    model = tiny if kind == "llama" else qwen2_tiny(tok)
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    ids, pos = torch.tensor([5, 17, 300]), torch.tensor([len(p) for p in prompts])
    width = int(pos.max()) + 1
    ours, theirs = prefilled(model, prompts), prefilled(model, prompts)
    cos, sin = model.model.rotary_emb(ours.k[0], pos[:, None])
    logits = M.decode_forward(M.step_weights(model), ids, pos, pos, cos, sin, ours.k, ours.v, width)
    theirs.plan(slice(0, 3), pos[:, None], width)
    ref = model(input_ids=ids[:, None], position_ids=pos[:, None], cache=theirs, use_cache=True,
                attention_mask=M._attention_mask(pos[:, None], None, width, torch.float32)).logits[:, -1]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max() < 1e-4, "the written-out step computes what transformers computes"
    assert (ref - model(input_ids=ids[:, None]).logits[:, -1]).abs().max() > 1e-2, "the cache matters here"
    for k, kt in zip(ours.k + ours.v, theirs.k + theirs.v):     # and it wrote the same keys and values
        assert torch.allclose(k, kt, atol=1e-5)


def test_step_weights_refuses_what_it_does_not_implement(tiny, tok):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="without --compile"):
        M.step_weights(gpt2)
    wrapped = torch.nn.Module()
    wrapped.config = tiny.config                   # looks like a llama, has no model.model.layers
    with pytest.raises(ValueError, match="without --compile"):
        M.step_weights(wrapped)


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile on the CPU needs a C++ compiler")


@needs_compiler
def test_compiled_sampler_matches_the_default_and_compiles_once(tiny, tok):
    from torch._dynamo.utils import counters
    prompts = [M.chat_prompt(tok, q) for q in QUESTIONS]
    kw = dict(max_new_tokens=12, greedy=True, code=False, ignore_eos=True)
    ref = M.sample(tiny, tok, prompts, **kw)
    outs = M.sample(tiny, tok, prompts, compile=True, **kw)
    for o, r in zip(outs, ref):
        assert o.response_ids == r.response_ids
        assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    other = copy.deepcopy(tiny)                  # as each E-step samples from a fresh copy
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = M.sample(other, tok, prompts * 3, batch_size=5, compile=True, **kw)   # other widths and lengths
    assert counters["stats"]["unique_graphs"] == graphs, "one compilation serves every width and model copy"
    assert [o.response_ids for o in moved[:3]] == [o.response_ids for o in M.sample(other, tok, prompts, **kw)]
    assert any(m.response_ids != r.response_ids for m, r in zip(moved, ref)), "the new weights were read"


@needs_compiler
def test_compiled_sampler_refuses_a_wrapped_model(tiny, tok):
    wrapped = torch.nn.Module()
    wrapped.config = tiny.config
    wrapped.inner = tiny
    with pytest.raises(ValueError, match="without --compile"):
        M.sample(wrapped, tok, [M.chat_prompt(tok, "Hi")], max_new_tokens=2, compile=True)


@needs_compiler
def test_bench_prints_the_compiled_sampler_beside_generate(tiny, tok, capsys):
    import bench
    bench.bench_sampler(tiny, tok, [3], 6, compiled=True)
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "compiled tok/s" in header
    cells = row.split()
    assert cells[0] == "3" and cells[4] == "3/3", "the default sampler matches generate (fp32)"
    assert float(cells[5]) > 0 and cells[6].endswith("x") and cells[7] == "3/3", "so does the compiled one"
