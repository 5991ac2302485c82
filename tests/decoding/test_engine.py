"""Decoding engine: cache exactness, batching == alone, early stop, self-correction, queue, streaming."""

import dataclasses

import pytest
import torch

from conftest import tiny_model
from engine_helpers import ScriptedModel, sharp_model
from unmask.decoding.ar import ar_generate
from unmask.decoding.cache import CacheView, attention_mask
from unmask.decoding.denoise import denoise
from unmask.decoding.engine import Engine, QueueFull
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.reference import reference_generate

PROMPTS = ["def main(args):\n    return", "import os", "class Parser(object):\n    def parse(self, text):"]


def opts(**kw):
    base = dict(max_new_tokens=24, block_length=8, policy="threshold", threshold=0.6, early_stop=False)
    return DecodeOptions(**{**base, **kw})


@pytest.mark.parametrize("shift", [False, True])
def test_fixed_uncached_equals_reference_sampler(tokenizer, shift):
    # random weights for the shifted model: the sharp one ties confidences at 1.0, and ties may break
    # either way in the two samplers
    model = tiny_model(tokenizer, logits_shift=True) if shift else sharp_model(tokenizer)
    prompt = tokenizer.encode(PROMPTS[0])
    ref, ref_nfe = reference_generate(model, torch.tensor([prompt]), gen_length=32, block_length=8, steps=16)
    r = Engine(model).generate(prompt, opts(max_new_tokens=32, policy="fixed", steps=16, cache="none"))
    assert r.tokens == ref[0, len(prompt):].tolist()
    assert r.nfe == ref_nfe == 16 and r.steps_per_block == [4, 4, 4, 4]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_uncached(tokenizer, cache):
    model = sharp_model(tokenizer)
    prompt = tokenizer.encode(PROMPTS[2])
    plain = Engine(model).generate(prompt, opts(cache="none"))
    cached = Engine(model).generate(prompt, opts(cache=cache, cache_refresh=1))
    assert cached.tokens == plain.tokens and cached.nfe == plain.nfe


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_causal_cache_is_exact(tokenizer, cache, shift):
    # prompt of 9 tokens: the first decode block shares its model block (size 8) with the prompt's tail
    model = sharp_model(tokenizer, attention="block_causal", block_size=8, logits_shift=shift)
    prompt = tokenizer.encode(PROMPTS[0])
    assert len(prompt) % 8
    plain = Engine(model).generate(prompt, opts(cache="none"))
    cached = Engine(model).generate(prompt, opts(cache=cache))
    assert cached.tokens == plain.tokens
    assert len(set(plain.tokens)) > 2  # the model is context-sensitive, not a constant
    assert plain.steps_per_block[0] <= 8 - len(prompt) % 8  # decode blocks follow model blocks


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_block_causal_forwards_stop_at_the_current_model_block(tokenizer, cache):
    # later model blocks cannot reach the block being decoded, so no pass computes them, yet the tokens
    # are the full-canvas reference sampler's (greedy, fixed steps, the whole canvas every step)
    model = sharp_model(tokenizer, attention="block_causal", block_size=8)
    prompt = tokenizer.encode(PROMPTS[0])[:8]  # decode blocks = model blocks = the reference's blocks
    ref, _ = reference_generate(model, torch.tensor([prompt]), gen_length=32, block_length=8, steps=32)
    ends = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: ends.append(int(kw["positions"].max()) + 1), with_kwargs=True)
    r = Engine(model).generate(prompt, opts(max_new_tokens=32, policy="fixed", steps=32, cache=cache))
    hook.remove()
    assert r.tokens == ref[0, len(prompt):].tolist() and len(set(r.tokens)) > 2
    assert ends[0] == 16 and max(ends) == 40 and sorted(ends) == ends  # never past the block being decoded


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_compiled_engine_keeps_window_shapes_static(tokenizer, cache, monkeypatch):
    # torch.compile stands in as the identity, so the test sees exactly the shapes a compiled graph would
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = sharp_model(tokenizer, attention="block_causal", block_size=8, logits_shift=True)
    prompt = tokenizer.encode(PROMPTS[0])
    eager = Engine(model).generate(prompt, opts(cache=cache))
    engine = Engine(model, compile=True)
    shapes = set()
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: shapes.add((args[0].shape, args[0].stride(), kw["kv_len"])), with_kwargs=True)
    compiled = engine.generate(prompt, opts(cache=cache))
    # another prompt length: the key/value length is bucketed (128 here), so the same graphs serve it
    longer = tokenizer.encode(PROMPTS[1])
    assert len(longer) != len(prompt)
    compiled_longer = engine.generate(longer, opts(cache=cache))
    hook.remove()
    assert compiled.tokens == eager.tokens  # padded windows and keys change nothing
    assert compiled_longer.tokens == Engine(model).generate(longer, opts(cache=cache)).tokens
    # for all blocks: the first block's refresh, one window shape, and one for a later block's first step
    # (which recomputes the block before it); strides too, as guards check them
    assert len(shapes) == 3 and {kv for _, _, kv in shapes} == {128}


@pytest.mark.parametrize("shift", [False, True])
def test_block_causal_decoding_computes_the_prompt_once(tokenizer, corpus_texts, shift):
    # finished blocks' K/V are final: after the first block's refresh, each step recomputes at most the
    # block before the current one and the current one, however long the prompt
    model = sharp_model(tokenizer, attention="block_causal", block_size=8, logits_shift=shift)
    prompt = tokenizer.encode(corpus_texts[3])[200:216]
    assert len(prompt) == 16
    o = opts(threshold=1.0)  # one token a step: later tokens see earlier ones
    plain = Engine(model).generate(prompt, o.replace(cache="none"))
    spans = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: spans.append((int(kw["positions"].min()), int(kw["positions"].max()) + 1)),
        with_kwargs=True)
    cached = Engine(model).generate(prompt, o.replace(cache="prefix"))
    hook.remove()
    assert cached.tokens == plain.tokens and len(set(plain.tokens)) > 2
    assert spans[0] == (0, 24)  # the prompt and the first block, once
    assert all(e - s <= 16 for s, e in spans[1:]) and len(spans) == cached.nfe


def test_dual_cache_is_an_approximation_on_bidirectional_models(tokenizer):
    # guards the test above: with a stale cache a bidirectional model *does* decode differently
    model = sharp_model(tokenizer)
    prompt = tokenizer.encode(PROMPTS[0])
    a = Engine(model).generate(prompt, opts(max_new_tokens=32, cache="none"))
    b = Engine(model).generate(prompt, opts(max_new_tokens=32, cache="dual"))
    assert a.tokens != b.tokens


def test_window_step_reads_and_writes_the_cache_in_place(tokenizer):
    """Two rows of different lengths, windows at different slots: same logits as full forwards.
    One layer, so the K/V outside the window do not depend on the changed tokens and stay exact."""
    model = tiny_model(tokenizer, n_layers=1)
    c = model.config
    seqs = [torch.randint(10, 500, (20,)), torch.randint(10, 500, (13,))]
    C = 20
    cache = model.new_cache(2, C + 1)
    tokens = torch.stack([torch.nn.functional.pad(s, (0, C - len(s)), value=c.pad_id) for s in seqs])
    pos = torch.arange(C).expand(2, -1)
    with torch.no_grad():
        mask = attention_mask(c, pos, pos < torch.tensor([[20], [13]]), [20, 13], C)
        model(tokens, positions=pos, cache=CacheView(cache, slice(0, 2), None, C), kv_len=C, attn_mask=mask)
        # change a few tokens in each row's window, then run only the windows [5, 9) and [9, 12)
        new = [s.clone() for s in seqs]
        new[0][5:9] = torch.randint(10, 500, (4,))
        new[1][9:12] = torch.randint(10, 500, (3,))
        slots = torch.tensor([[5, 6, 7, 8], [9, 10, 11, C]])
        win = torch.stack([new[0][5:9], torch.cat([new[1][9:12], torch.tensor([c.pad_id])])])
        qpos = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
        wmask = attention_mask(c, qpos, slots < C, [20, 13], C)
        out = model(win, positions=qpos, cache=CacheView(cache, slice(0, 2), slots, C), kv_len=C, attn_mask=wmask)
        full0 = model(new[0][None])
        full1 = model(new[1][None])
    # the window's K/V replaced the stale ones in place; keys outside the window are unchanged,
    # so the window's logits equal a full forward of the new sequence
    assert torch.allclose(out[0], full0[0, 5:9], atol=1e-4)
    assert torch.allclose(out[1, :3], full1[0, 9:12], atol=1e-4)


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_batched_prompts_of_different_lengths_equal_each_alone(tokenizer, attention):
    model = sharp_model(tokenizer, attention=attention)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    # different options per request: cache modes, policies, lengths, an infill suffix
    options = [opts(cache="dual"), opts(cache="prefix", policy="fixed", max_new_tokens=16),
               opts(cache="none", block_length=4, max_new_tokens=12)]
    suffixes = [None, tokenizer.encode("\n    pass\n"), None]
    alone = [Engine(model).generate(p, o, suffix_ids=s) for p, o, s in zip(prompts, options, suffixes)]
    # max_batch 2: the third request joins when the first finishes, mid-way through the second
    engine = Engine(model, max_batch=2)
    ids = [engine.submit(p, o, suffix_ids=s) for p, o, s in zip(prompts, options, suffixes)]
    results, sizes = {}, []
    while engine.has_work():
        events = engine.step()
        sizes.append(len(events))
        results.update({e.request_id: e.result for e in events if e.done})
    assert max(sizes) == 2
    for rid, solo in zip(ids, alone):
        assert results[rid].tokens == solo.tokens
        assert results[rid].nfe == solo.nfe


def eos_model(tokenizer, eos_at: int, prompt_len: int):
    """Predicts token 100 + position everywhere, EOS at generated index `eos_at`; confident left to right."""
    eos = tokenizer.eos_id

    def rule(pos, cur):
        i = pos - prompt_len
        return (eos, 0.9) if i == eos_at else (100 + pos, 0.9 - 0.001 * i)

    return ScriptedModel(tokenizer, rule)


def test_early_stop_stops_after_eos_and_never_before(tokenizer):
    prompt = [5, 6, 7, 8]
    model = eos_model(tokenizer, eos_at=11, prompt_len=len(prompt))
    o = opts(max_new_tokens=40, threshold=0.99, early_stop=True)
    stopped = Engine(model).generate(prompt, o)
    full = Engine(model).generate(prompt, o.replace(early_stop=False))
    assert stopped.tokens == full.tokens == [100 + len(prompt) + i for i in range(11)]
    assert stopped.finish_reason == "eos"
    assert len(stopped.steps_per_block) == 2 < len(full.steps_per_block) == 5  # EOS in block 2: stop there
    assert stopped.nfe == 16 < full.nfe


def test_stop_check_ends_the_request_after_the_block_that_satisfies_it(tokenizer):
    prompt = [5, 6, 7, 8]
    model = eos_model(tokenizer, eos_at=10_000, prompt_len=len(prompt))
    o = opts(max_new_tokens=40, threshold=0.99)
    seen: list[list[int]] = []

    def stop_when(ids):  # "stop string" = answer token 11, which sits in block 2 (answer tokens 8..15)
        seen.append(ids)
        return 100 + len(prompt) + 11 in ids

    stopped = Engine(model).generate(prompt, o, stop_when=stop_when)
    full = Engine(model).generate(prompt, o)
    assert stopped.finish_reason == "stop" and full.finish_reason == "length"
    assert stopped.tokens == full.tokens[:16]  # the whole committed prefix; the caller cuts the text
    assert len(stopped.steps_per_block) == 2 and stopped.nfe == 16 < full.nfe == 40
    assert [len(ids) for ids in seen] == [8, 16]  # asked once per finished block, about committed tokens only


def test_stop_strings_end_generation_early_in_the_pipeline(tiny_pipeline):
    o = DecodeOptions(max_new_tokens=32, block_length=8, policy="fixed", steps=32, early_stop=False)
    free = tiny_pipeline.generate("def f(x):", o)
    stop = free.text[:4]  # appears in the first block
    assert stop and free.nfe == 32
    stopped = tiny_pipeline.generate("def f(x):", o.replace(stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.find(stop)]
    assert stopped.nfe < free.nfe


@pytest.mark.parametrize("decoder", ["engine", "ar"])
def test_frequency_penalty_breaks_a_repetition_loop(tokenizer, decoder):
    # a model that wants token 50 everywhere (p 0.6, log-odds ~6 over the next token): each committed 50
    # costs it 2 logits, so after three it is no longer the best choice
    looping = ScriptedModel(tokenizer, lambda pos, cur: (50, 0.6))
    o = opts(max_new_tokens=12, block_length=4, threshold=0.99)
    if decoder == "ar":
        looping.config = dataclasses.replace(looping.config, attention="causal")
        run = lambda **kw: ar_generate(looping, [5, 6], 12, **kw).tokens  # noqa: E731
    else:
        run = lambda **kw: Engine(looping).generate([5, 6], o.replace(**kw)).tokens  # noqa: E731
    assert run() == [50] * 12
    penalized = run(frequency_penalty=2.0)
    assert penalized[:3] == [50] * 3 and 50 not in penalized[4:]


def test_early_stop_does_not_fire_without_eos(tokenizer):
    prompt = [5, 6, 7, 8]
    model = eos_model(tokenizer, eos_at=10_000, prompt_len=len(prompt))
    r = Engine(model).generate(prompt, opts(max_new_tokens=20, early_stop=True))
    assert len(r.tokens) == 20 and r.finish_reason == "length"


def test_early_stop_fills_the_rest_with_eos_in_denoise(tokenizer):
    prompt = [5, 6, 7, 8]
    model = eos_model(tokenizer, eos_at=3, prompt_len=len(prompt))
    out = denoise(model, prompt + [tokenizer.mask_id] * 24, opts(early_stop=True))
    assert out.stopped_at_eos and out.canvas[len(prompt) + 3] == tokenizer.eos_id
    assert out.canvas[len(prompt) + 8 :] == [tokenizer.eos_id] * 16  # the blocks after the EOS block
    assert out.steps_per_block == [1]  # threshold 0.6: the confident block commits at once


def test_self_correction_terminates_within_its_bound(tokenizer):
    # a model that always wants the *next* token id at 0.95: every rewrite invites another one
    model = ScriptedModel(tokenizer, lambda pos, cur: ((cur + 1) % 400 if cur != tokenizer.mask_id else 50, 0.95))
    prompt = [5, 6, 7]
    o = opts(max_new_tokens=16, threshold=0.9, self_correct=True, max_correction_steps=3)
    r = Engine(model).generate(prompt, o)
    assert r.steps_per_block == [1 + 3, 1 + 3]  # one step fills the block, then exactly the bound
    assert r.tokens == [50 + 3] * 16  # three rewrites happened: 50 -> 51 -> 52 -> 53
    plain = Engine(model).generate(prompt, o.replace(self_correct=False))
    assert plain.tokens == [50] * 16 and plain.steps_per_block == [1, 1]


def test_self_correction_remasks_improbable_tokens_and_stops_when_stable(tokenizer):
    # the first proposal is weak (p 0.3 < remask_below); after a re-mask the model is sure of token 60
    seen = set()

    def rule(pos, cur):
        if cur == tokenizer.mask_id:
            first = pos not in seen
            seen.add(pos)
            return (40, 0.3) if first else (60, 0.99)
        return (cur, 0.3 if cur == 40 else 0.99)

    model = ScriptedModel(tokenizer, rule)
    o = opts(max_new_tokens=8, threshold=0.2, self_correct=True, max_correction_steps=5)
    r = Engine(model).generate([5, 6, 7], o)
    assert r.tokens == [60] * 8
    assert r.steps_per_block == [4]  # fill (40s), re-mask, refill (60s), stable


def test_threshold_one_commits_one_token_per_step(tokenizer):
    model = sharp_model(tokenizer)
    r = Engine(model).generate(tokenizer.encode(PROMPTS[1]), opts(threshold=1.0, max_new_tokens=20))
    assert r.steps == r.nfe == 20 and r.steps_per_block == [8, 8, 4]


def test_denoise_fills_interior_masks_and_keeps_context(tokenizer):
    model = sharp_model(tokenizer, attention="block_causal")
    M = tokenizer.mask_id
    text = tokenizer.encode(PROMPTS[2])
    canvas = text[:3] + [M] * 5 + text[3:8] + [M] * 6 + text[8:]
    outs = [denoise(model, canvas, opts(cache=c, block_length=4)) for c in ("none", "prefix", "dual")]
    for out in outs:
        assert M not in out.canvas
        assert [t for t, c in zip(out.canvas, canvas) if c != M] == [c for c in canvas if c != M]
        assert out.canvas == outs[0].canvas  # block_causal: caches exact with context on both sides


def test_queue_full_cancel_and_counts(tokenizer):
    model = tiny_model(tokenizer)
    engine = Engine(model, max_batch=1, max_queue=2)
    a = engine.submit([5, 6], opts(max_new_tokens=8))
    b = engine.submit([5, 6], opts(max_new_tokens=8), request_id="b")
    with pytest.raises(QueueFull, match="queue full"):
        engine.submit([5, 6], opts())
    engine.step()  # admits a; b waits for the single batch row
    with pytest.raises(OptionsError, match="already in use"):
        engine.submit([7], opts(), request_id="b")
    assert engine.num_active == 1 and engine.num_waiting == 1
    engine.cancel(a)  # active
    assert engine.num_active == 0 and engine.has_work()
    events = engine.step()
    assert [e.request_id for e in events] == ["b"]
    engine.cancel("b")
    engine.cancel("unknown")  # already gone: ignored
    assert not engine.has_work() and engine.step() == []


def test_bad_requests_are_clear_errors(tokenizer):
    engine = Engine(tiny_model(tokenizer, max_seq_len=64))
    with pytest.raises(OptionsError, match="exceeds the model context"):
        engine.submit([5] * 60, opts(max_new_tokens=8))
    with pytest.raises(OptionsError, match="mask token"):
        engine.submit([5, tokenizer.mask_id], opts())
    with pytest.raises(OptionsError, match="causal"):
        Engine(tiny_model(tokenizer, attention="causal"))


def test_streaming_shows_text_emerging_and_ends_with_the_result(tiny_pipeline):
    events = []
    result = tiny_pipeline.generate("def f(x):", on_step=events.append, max_new_tokens=16, block_length=8,
                                    policy="fixed", steps=8, early_stop=False)
    committed = [e.committed for e in events]
    assert committed == sorted(committed) and committed[0] >= 1 and len(events) == result.steps == 8
    assert all(len(e.canvas) == 16 for e in events)
    assert events[0].canvas.count(tiny_pipeline.tokenizer.mask_id) == 14  # 2 tokens per step
    assert events[-1].done and events[-1].result is result
    assert events[-1].canvas[: len(result.tokens)] == result.tokens
    assert [e.done for e in events[:-1]] == [False] * 7
    assert all(len(e.changed) == 2 for e in events)


def test_ar_twin_streams_tokens(tokenizer):
    from unmask.pipeline import Pipeline

    pipe = Pipeline(tiny_model(tokenizer, attention="causal"), tokenizer)
    events = []
    result = pipe.generate("import os", on_step=events.append, max_new_tokens=6)
    assert events[-1].done and events[-1].result is result
    assert [e.committed for e in events[:-1]] == list(range(1, len(result.tokens) + 1))


def test_a_model_that_prefers_the_mask_token_still_finishes(tokenizer):
    model = ScriptedModel(tokenizer, lambda pos, cur: (tokenizer.mask_id, 0.9))
    out = denoise(model, [5, 6] + [tokenizer.mask_id] * 8, opts())
    assert tokenizer.mask_id not in out.canvas and out.steps <= 8


def test_batched_ar_rows_of_different_lengths_equal_each_alone(tokenizer):
    """Left-padded AR batch: each row, with its own budget, writes what it writes alone (EOS ends a row)."""
    from unmask.decoding.ar import ar_generate_batch

    model = tiny_model(tokenizer, attention="causal", seed=5)
    prompts = [tokenizer.encode(p) for p in PROMPTS] + [[tokenizer.eos_id, *tokenizer.encode("x = ")]]
    budgets = [9, 3, 14, 6]
    for penalty, stop in ((0.0, True), (0.7, False)):
        batch = ar_generate_batch(model, prompts, budgets, frequency_penalty=penalty, stop_at_eos=stop)
        alone = [ar_generate(model, p, n, frequency_penalty=penalty, stop_at_eos=stop) for p, n in zip(prompts, budgets)]
        assert [r.tokens for r in batch] == [r.tokens for r in alone]
        assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone]
        assert [r.nfe for r in batch] == [r.nfe for r in alone]  # each row counts the passes it was live for
    with pytest.raises(ValueError, match="2 budgets for 4 prompts"):
        ar_generate_batch(model, prompts, [1, 2])


@pytest.mark.parametrize("attention", ["block_causal", "causal"])
def test_generate_many_yields_every_prompt_as_decoded_alone(tokenizer, attention):
    from unmask.decoding.generate import generate_many
    from unmask.pipeline import Pipeline

    model = sharp_model(tokenizer, attention=attention) if attention != "causal" else tiny_model(tokenizer, attention="causal")
    pipe = Pipeline(model, tokenizer)
    # text prompts are healed (the first ends in "\n", a token longer ones extend), ids are not
    prompts = [PROMPTS[0] + "\n", tokenizer.encode(PROMPTS[1]), PROMPTS[2]]
    options = [opts(max_new_tokens=n, stop=["\n\n"] if n == 8 else []) for n in (8, 16, 12)]
    got = dict(generate_many(pipe, prompts, options, max_batch=2))
    assert sorted(got) == [0, 1, 2]
    for i, (p, o) in enumerate(zip(prompts, options)):
        alone = pipe.generate(p, o)
        assert (got[i].tokens, got[i].text, got[i].prompt_tokens) == (alone.tokens, alone.text, alone.prompt_tokens)
    assert pipe.generate_many([], opts()) == []
    with pytest.raises(OptionsError, match="max_batch must be >= 1"):
        pipe.generate_many(PROMPTS, opts(), max_batch=0)
    in_order = pipe.generate_many(PROMPTS, opts(max_new_tokens=10), max_batch=2)
    assert [r.text for r in in_order] == [pipe.generate(p, opts(max_new_tokens=10)).text for p in PROMPTS]
    # each prompt keeps its own sampling options and seed, in one batch as alone
    mixed = [options[0], opts(max_new_tokens=9, temperature=0.9, seed=3), opts(max_new_tokens=6, frequency_penalty=1.0)]
    got = dict(generate_many(pipe, prompts, mixed, max_batch=3))
    assert [got[i].tokens for i in range(3)] == [pipe.generate(p, o).tokens for p, o in zip(prompts, mixed)]


@pytest.mark.parametrize("shift", [False, True])
def test_prefix_store_reuses_finished_prompt_blocks_exactly(tokenizer, corpus_texts, shift):
    """block_causal: a later request whose prompt starts like an earlier one copies the stored K/V of the
    shared model blocks and computes only from the first new block — and decodes what it decodes alone."""
    model = sharp_model(tokenizer, attention="block_causal", block_size=8, logits_shift=shift)
    text = tokenizer.encode(corpus_texts[3])
    shared = text[200:232]  # four model blocks
    first, second = shared + text[300:305], shared + text[400:411]  # second: 32 shared + 11 new tokens
    other = text[500:543]
    o = opts(threshold=1.0, max_new_tokens=16)
    engine = Engine(model, prefix_blocks=16)
    starts = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: starts.append(int(kw["positions"].min())),
                                           with_kwargs=True)
    results = []
    for prompt in (first, second, other):
        starts.clear()
        results.append(engine.generate(prompt, o))
        results[-1].first_start = starts[0]
    hook.remove()
    for prompt, r in zip((first, second, other), results):
        assert r.tokens == Engine(model).generate(prompt, o.replace(cache="none")).tokens
    assert results[0].first_start == 0  # nothing stored yet: the whole prompt is computed ...
    assert results[1].first_start == 32  # ... then only past the 4 shared blocks
    assert results[2].first_start == 0  # another prompt: no match
    assert engine.prefix.reused == 4 and len(engine.prefix) == 4 + 1 + 5  # complete prompt blocks, each once
    with pytest.raises(OptionsError, match="block_causal"):
        Engine(sharp_model(tokenizer), prefix_blocks=4)


def test_prefix_store_evicts_the_least_recently_used_block(tokenizer):
    import torch as t

    from unmask.decoding.prefix import PrefixStore

    store = PrefixStore(capacity_blocks=2, block_size=2)
    kv = t.zeros(1, 1, 2, 1)
    store.insert([1, 2, 3, 4], 0, kv, kv)
    store.insert([1, 2, 3, 4], 1, kv, kv)
    assert len(store.lookup([1, 2, 3, 4, 5], 2)) == 2
    store.insert([7, 8], 0, kv, kv)  # evicts [1, 2] (least recently used: looked up before [1, 2, 3, 4])
    assert store.lookup([1, 2, 3, 4], 2) == [] and len(store.lookup([7, 8], 1)) == 1


def test_generate_many_reuses_a_shared_beginning(tokenizer, corpus_texts, monkeypatch):
    from unmask.decoding import generate
    from unmask.pipeline import Pipeline

    pipe = Pipeline(sharp_model(tokenizer, attention="block_causal", block_size=8), tokenizer)
    text = tokenizer.encode(corpus_texts[3])
    prompts = [text[200:240] + text[300 + 10 * i : 305 + 10 * i] for i in range(4)]  # 5 shared blocks each
    o = opts(threshold=1.0, max_new_tokens=8)
    computed = []
    hook = pipe.model.register_forward_pre_hook(lambda m, args, kw: computed.append(args[0].numel()), with_kwargs=True)
    reused = dict(generate.generate_many(pipe, prompts, [o] * 4, max_batch=1))
    with_store, computed[:] = sum(computed), []
    monkeypatch.setattr(generate, "PREFIX_BLOCKS", 0)
    plain = dict(generate.generate_many(pipe, prompts, [o] * 4, max_batch=1))
    hook.remove()
    assert [reused[i].tokens for i in range(4)] == [plain[i].tokens for i in range(4)]
    assert [plain[i].tokens for i in range(4)] == [pipe.generate(p, o).tokens for p in prompts]
    assert with_store == sum(computed) - 3 * 40  # the three later prompts skip the 40 shared tokens
