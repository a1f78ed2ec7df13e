"""generate(): transformers-style keywords (greedy by default, max_new_tokens / max_length,
do_sample, top-k/top-p, repetition_penalty, eos, attention_mask for padded prompts, the return
types), greedy == argmax of the full forward, one parallel prefill, CUDA graphs; and the LM's
``return_dict`` forward."""

import warnings

import pytest
import torch

from lrnnx.architectures import LRNNLMHeadModel
from lrnnx.architectures.lm import CausalLMOutput
from lrnnx.models.registry import available_models
from lrnnx.utils import GenerationOutput, filter_logits, generate

torch.manual_seed(0)
D, N, V = 16, 16, 29
MIXERS = sorted(set(available_models()) | {"attn"})
STACK = ["s5", "attn", "mamba" if "mamba" in MIXERS else "lru"]


def make(types, dtype=torch.float64):
    torch.manual_seed(0)
    lm = LRNNLMHeadModel(D, N, len(types), V, types, d_intermediate=16)
    with torch.no_grad():  # a sharper output distribution than the 0.02-std init gives
        lm.embedding.weight.normal_(0, 1.0)
    return lm.to(dtype).eval()


@pytest.fixture(scope="module")
def stack():
    return make(STACK)


def assert_greedy(lm, seq, L):
    """Every generated token is the argmax of the full forward over the sequence before it."""
    with torch.no_grad():
        logits = lm(seq[:, :-1])
    torch.testing.assert_close(logits[:, L - 1 :].argmax(-1), seq[:, L:], rtol=0, atol=0)


def argmax_decode(lm, prompt, n):
    """Greedy decoding by a full forward over the whole sequence for every new token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


# ------------------------------------------------------------------------------ greedy default
@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_equals_argmax_of_forward(mixer):
    lm = make([mixer, "attn"] if mixer != "attn" else ["attn", "attn"])
    prompt = torch.randint(0, V, (2, 5))
    seq = generate(lm, prompt, max_new_tokens=8)
    assert isinstance(seq, torch.Tensor) and seq.dtype == torch.long
    assert seq.shape == (2, 13) and torch.equal(seq[:, :5], prompt)
    assert_greedy(lm, seq, 5)


def test_default_is_greedy_deterministic_and_equals_repeated_forward(stack):
    prompt = torch.randint(0, V, (3, 4))
    a = generate(stack, prompt, max_new_tokens=7)
    b = generate(stack, prompt, max_new_tokens=7)
    assert torch.equal(a, b)
    assert torch.equal(a, argmax_decode(stack, prompt, 7))
    assert torch.equal(stack.generate(prompt, 7), a)  # the shortcut, max_new_tokens positional
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # temperature=0 (greedy) is accepted without a warning
        assert torch.equal(generate(stack, prompt, 7, temperature=0), a)


def test_max_length_and_max_new_tokens(stack):
    prompt = torch.randint(0, V, (2, 4))
    ref = generate(stack, prompt, max_new_tokens=5)
    assert torch.equal(generate(stack, prompt, max_length=9), ref)
    assert torch.equal(generate(stack, prompt, max_new_tokens=5, max_length=9), ref)  # consistent
    assert torch.equal(stack.generate(prompt, max_length=9), ref)
    assert torch.equal(generate(stack, prompt, max_length=4), prompt)  # nothing to add
    with pytest.raises(ValueError, match="disagree"):
        generate(stack, prompt, max_new_tokens=5, max_length=12)
    with pytest.raises(ValueError, match="max_new_tokens / max_length"):
        generate(stack, prompt)
    with pytest.raises(ValueError, match="max_length"):
        generate(stack, prompt, max_length=3)


# ------------------------------------------------------------------------------------ sampling
def test_do_sample_is_reproducible_with_a_seed(stack):
    prompt = torch.randint(0, V, (4, 3))
    greedy = generate(stack, prompt, 10)

    def sampled(seed):
        torch.manual_seed(seed)  # the global generator, as with transformers
        return generate(stack, prompt, 10, do_sample=True, temperature=2.0)

    a, b = sampled(3), sampled(3)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    assert not torch.equal(a, sampled(4))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    c = generate(stack, prompt, 10, do_sample=True, generator=g())
    assert torch.equal(c, generate(stack, prompt, 10, do_sample=True, generator=g()))


def test_top_k_one_tiny_top_p_and_zero_temperature_sample_greedily(stack):
    prompt = torch.randint(0, V, (3, 4))
    greedy = generate(stack, prompt, 6)
    torch.manual_seed(0)
    assert torch.equal(generate(stack, prompt, 6, do_sample=True, top_k=1, temperature=1.3), greedy)
    assert torch.equal(generate(stack, prompt, 6, do_sample=True, top_p=1e-6), greedy)
    assert torch.equal(generate(stack, prompt, 6, do_sample=True, temperature=0), greedy)


def test_sampling_arguments_without_do_sample_warn_and_decode_greedily(stack):
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(stack, prompt, 5)
    with pytest.warns(UserWarning, match="do_sample"):
        out = generate(stack, prompt, 5, temperature=0.7, top_p=0.5)
    assert torch.equal(out, greedy)


def test_sampled_tokens_respect_top_k(stack):
    prompt = torch.randint(0, V, (4, 3))
    g = torch.Generator().manual_seed(0)
    seq = generate(stack, prompt, 12, do_sample=True, temperature=2.0, top_k=3, generator=g)
    with torch.no_grad():
        logits = stack(seq[:, :-1])[:, 2:]
    allowed = logits.topk(3, -1).indices
    assert (allowed == seq[:, 3:, None]).any(-1).all()
    assert not (logits.argmax(-1) == seq[:, 3:]).all()  # it did sample, not just take argmax


def test_sampled_tokens_respect_top_p(stack):
    prompt = torch.randint(0, V, (4, 3))
    g = torch.Generator().manual_seed(1)
    top_p, temp = 0.6, 1.5
    seq = generate(stack, prompt, 12, do_sample=True, temperature=temp, top_p=top_p, generator=g)
    with torch.no_grad():
        probs = (stack(seq[:, :-1])[:, 2:] / temp).softmax(-1)
    for b in range(4):
        for t in range(12):
            p = probs[b, t]
            order = p.argsort(descending=True).tolist()
            total, nucleus = 0.0, []
            for tok in order:  # smallest most-likely prefix with mass >= top_p
                nucleus.append(tok)
                total += float(p[tok])
                if total >= top_p:
                    break
            assert int(seq[b, 3 + t]) in nucleus


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = lambda f: torch.isfinite(f).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert kept(filter_logits(logits, top_p=0.75)) == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert kept(filter_logits(logits, top_p=0.85)) == [
        [True, True, True, False],
        [False, True, True, True],
    ]
    assert kept(filter_logits(logits, top_p=0.1)) == [
        [True, False, False, False],
        [False, False, False, True],
    ]
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert torch.equal(filter_logits(logits), logits)


def test_top_k_keeps_every_logit_tied_with_the_kth():
    """As transformers' TopKLogitsWarper (which lrnnx.hf's generate uses): equal logits are
    all kept or all dropped, never split by topk's arbitrary order."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 5.0]])
    got = filter_logits(logits, top_k=2)
    assert torch.isfinite(got).tolist() == [[True] * 4 + [False], [True] * 5]
    warpers = pytest.importorskip("transformers.generation.logits_process")
    assert torch.equal(got, warpers.TopKLogitsWarper(2)(None, logits.clone()))


# -------------------------------------------------------------------------- repetition penalty
class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are always ``logits``, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float64)

    def allocate_inference_cache(self, batch_size, max_seqlen):
        return {}

    def forward(self, ids, inference_cache=None, lengths=None):
        return self.logits.expand(*ids.shape, -1)

    def step(self, ids, cache):
        return self.logits.expand(ids.shape[0], -1), cache


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    model = FixedLogits([2.0, 1.5, -1.0, -1.2])
    prompt = torch.tensor([[0]])
    assert generate(model, prompt, 3)[0, 1:].tolist() == [0, 0, 0]  # no penalty
    out = generate(model, prompt, 3, repetition_penalty=2.0, output_scores=True)
    # step 1: 0 seen -> [1.0, 1.5, ...] picks 1; step 2: 0, 1 seen -> [1.0, 0.75, ..] picks 0
    assert out.sequences[0, 1:].tolist() == [1, 0, 0]
    torch.testing.assert_close(out.scores[0][0], torch.tensor([1.0, 1.5, -1.0, -1.2]).double())
    torch.testing.assert_close(out.scores[1][0], torch.tensor([1.0, 0.75, -1.0, -1.2]).double())

    negative = FixedLogits([-0.5, -0.6, -0.8, 9.0])
    prompt = torch.tensor([[3, 0]])  # 3 (9.0 -> 4.5) stays the best; 0: -0.5 -> -1.0
    out = generate(negative, prompt, 1, repetition_penalty=2.0, output_scores=True)
    torch.testing.assert_close(out.scores[0][0], torch.tensor([-1.0, -0.6, -0.8, 4.5]).double())

    # padding is not part of a prompt: a padded-out token is not penalized
    padded = torch.tensor([[0, 1], [1, 1]])  # row 0: left padding with token 0
    mask = torch.tensor([[0, 1], [1, 1]])
    seq = generate(model, padded, 1, repetition_penalty=2.0, attention_mask=mask)
    assert seq[:, 2].tolist() == [0, 0]


def test_repetition_penalty_on_the_lm(stack):
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(stack, prompt, 8)
    assert torch.equal(generate(stack, prompt, 8, repetition_penalty=1.0), greedy)
    seq = generate(stack, prompt, 8, repetition_penalty=1e9)
    for row in seq.tolist():  # an overwhelming penalty: no token is chosen twice
        assert len(set(row[4:])) == 8 and not set(row[4:]) & set(row[:4])


# ----------------------------------------------------------------------------------------- eos
def test_eos_stops_sequences_and_pads(stack):
    prompt = torch.randint(0, V, (3, 4))
    greedy = generate(stack, prompt, 10)
    eos = int(greedy[0, 4 + 2])  # the third token of sequence 0
    pad = (eos + 1) % V
    out = generate(
        stack, prompt, 10, eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True
    )
    gen, ref = out.sequences[:, 4:], greedy[:, 4:]
    expected_stop = []
    for b in range(3):
        hits = (ref[b] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else None
        expected_stop.append(stop)
        n = gen.shape[1] if stop is None else stop
        assert torch.equal(gen[b, :n], ref[b, :n])  # identical up to and including eos
        assert (gen[b, n:] == pad).all()
        assert bool(out.finished[b]) == (stop is not None)
    assert expected_stop[0] is not None and expected_stop[0] <= 3
    if all(s is not None for s in expected_stop):
        assert out.num_new_tokens == max(expected_stop)
    else:
        assert out.num_new_tokens == 10
    single = generate(stack, prompt[:1], 10, eos_token_id=eos)
    assert single.shape == (1, 4 + expected_stop[0])  # stops early when all finished
    assert int(single[0, -1]) == eos


def test_eos_list_and_default_padding(stack):
    prompt = torch.randint(0, V, (3, 4))
    greedy = generate(stack, prompt, 8)
    eos = [int(greedy[0, 5]), int(greedy[1, 6])]
    seq = generate(stack, prompt, 8, eos_token_id=eos)
    for b in range(3):
        row, ref = seq[b, 4:].tolist(), greedy[b, 4:].tolist()
        stops = [t for t, tok in enumerate(ref) if tok in eos]
        n = stops[0] + 1 if stops else len(ref)
        assert row[:n] == ref[:n]
        assert all(tok == eos[0] for tok in row[n:])  # padded with the first eos id
    assert torch.equal(generate(stack, prompt, 8, eos_token_id=torch.tensor(eos)), seq)


# ------------------------------------------------------------------------------ padded prompts
LENS = [5, 2, 7, 4]


def padded_prompts(side, pad=3):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, V, (n,), generator=g) for n in LENS]
    L = max(LENS)
    ids = torch.full((len(rows), L), pad)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[b, cols], mask[b, cols] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize(
    "types", [["s5"], ["mamba"], ["attn"], STACK], ids=["s5", "mamba", "attn", "stack"]
)
def test_padded_prompts_continue_as_each_row_alone(types):
    lm = make(types)
    n_new = 6
    alone = {}
    for side in ("left", "right"):
        rows, ids, mask = padded_prompts(side)
        if not alone:
            alone = {b: generate(lm, r[None], n_new)[0, len(r) :] for b, r in enumerate(rows)}
        seq = generate(lm, ids, n_new, attention_mask=mask)
        L = ids.shape[1]
        assert seq.shape == (len(rows), L + n_new) and torch.equal(seq[:, :L], ids)
        for b in range(len(rows)):
            assert torch.equal(seq[b, L:], alone[b]), (side, b)
        # a boolean mask and max_length (counting the padding) work the same
        again = lm.generate(ids, max_length=L + n_new, attention_mask=mask.bool())
        assert torch.equal(again, seq)


def test_padded_prompts_with_eos_and_penalty(stack):
    rows, ids, mask = padded_prompts("left", pad=V + 50)  # the pad value is never read
    L = ids.shape[1]
    kw = dict(eos_token_id=[5, 7], pad_token_id=0, repetition_penalty=1.3)
    seq = generate(stack, ids, 8, attention_mask=mask, **kw)
    for b, r in enumerate(rows):
        alone = generate(stack, r[None], 8, **kw)[0, len(r) :]
        got = seq[b, L:]
        assert torch.equal(got[: len(alone)], alone)
        assert (got[len(alone) :] == 0).all()  # finished early in the batch: padded


def test_attention_mask_errors(stack):
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="contiguous"):
        generate(stack, ids, 2, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1] * 5]))
    with pytest.raises(ValueError, match="no token"):
        generate(stack, ids, 2, attention_mask=torch.tensor([[0] * 5, [1] * 5]))
    with pytest.raises(ValueError, match="attention_mask"):
        generate(stack, ids, 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="0/1"):
        generate(stack, ids, 2, attention_mask=torch.full((2, 5), 2))
    ones = generate(stack, ids, 3, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert torch.equal(ones, generate(stack, ids, 3))


# -------------------------------------------------------------------------------- return types
def test_return_types(stack):
    prompt = torch.randint(0, V, (2, 4))
    seq = generate(stack, prompt, 5)
    assert type(seq) is torch.Tensor and seq.dtype == torch.long and seq.shape == (2, 9)
    out = generate(stack, prompt, 5, return_dict_in_generate=True)
    assert isinstance(out, GenerationOutput) and torch.equal(out.sequences, seq)
    assert out.scores is None and out.logits is None and torch.equal(out["sequences"], seq)
    assert out.num_new_tokens == 5 and out.tokens_per_s > 0 and out.prefill_s > 0
    assert not out.cuda_graph and not out.finished.any()
    out = generate(stack, prompt, 5, output_scores=True, output_logits=True)
    assert isinstance(out, GenerationOutput) and torch.equal(out.sequences, seq)
    assert isinstance(out.scores, tuple) and len(out.scores) == 5
    assert all(s.shape == (2, V) for s in out.scores)
    assert torch.equal(torch.stack(out.scores, 1).argmax(-1), seq[:, 4:])
    with torch.no_grad():  # the raw logits are those of the full forward
        full = stack(seq[:, :-1])[:, 3:]
    torch.testing.assert_close(torch.stack(out.logits, 1), full)
    torch.testing.assert_close(torch.stack(out.scores, 1), full)  # greedy: unprocessed
    sampled = generate(stack, prompt, 5, do_sample=True, top_k=3, output_scores=True)
    assert all(torch.isfinite(s).sum(-1).eq(3).all() for s in sampled.scores)  # filtered: -inf
    assert isinstance(stack.generate(prompt, 5, return_dict_in_generate=True), GenerationOutput)


def test_lm_forward_return_dict(stack):
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        logits = stack(ids)
        out = stack(ids, return_dict=True)
    assert type(logits) is torch.Tensor
    assert isinstance(out, CausalLMOutput) and torch.equal(out.logits, logits)
    assert torch.equal(out[0], logits)  # a namedtuple, as mamba_ssm's CausalLMOutput
    with torch.no_grad():
        cache = stack.allocate_inference_cache(2, 6)
        prefill = stack(ids, inference_cache=cache, return_dict=True).logits
    torch.testing.assert_close(prefill, logits)


# ------------------------------------------------------------------------- prefill and errors
def test_prefill_is_one_parallel_forward_then_steps():
    lm = make(STACK)
    calls = {"forward": [], "step": 0}
    lm.register_forward_pre_hook(
        lambda m, args, kwargs: calls["forward"].append(
            (args[0].shape, kwargs.get("lengths") is not None)
        ),
        with_kwargs=True,
    )
    step = lm.step

    def counting_step(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    lm.step = counting_step
    lm.train()
    generate(lm, torch.randint(0, V, (2, 7)), max_new_tokens=5)
    assert calls["forward"] == [(torch.Size([2, 7]), False)] and calls["step"] == 4
    assert lm.training  # the mode is restored
    _, ids, mask = padded_prompts("left")
    generate(lm, ids, max_new_tokens=2, attention_mask=mask)
    assert calls["forward"][1:] == [(ids.shape, True)] and calls["step"] == 5


def test_zero_new_tokens_and_errors():
    lm = make(["s5"])
    prompt = torch.randint(0, V, (2, 3))
    assert torch.equal(generate(lm, prompt, 0), prompt)
    out = generate(lm, prompt, 0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, prompt) and out.num_new_tokens == 0
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(lm, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(lm, prompt, 2, top_k=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(lm, prompt, 2, repetition_penalty=0.0)
    for kw in ({"temperature": float("nan")}, {"temperature": float("inf")},
               {"repetition_penalty": float("inf")}, {"top_p": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(kw))):
            generate(lm, prompt, 2, do_sample=True, **kw)
    for kw in ({"temperature": "0.7"}, {"top_p": "0.9"}, {"repetition_penalty": "1.2"}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            generate(lm, prompt, 2, do_sample=True, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, prompt, -1)
    with pytest.raises(TypeError, match="do_sample"):
        generate(lm, prompt, 2, do_sample="yes")
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(lm, prompt, 2, eos_token_id=-3)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(lm, prompt, 2, eos_token_id=[])
    with pytest.raises(ValueError, match="pad_token_id"):
        generate(lm, prompt, 2, pad_token_id=1.5)
    with pytest.raises(TypeError, match="input_ids"):
        generate(lm, prompt.float(), 2)
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(B, L\)"):
        generate(lm, prompt[0], 2)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(lm, prompt, 2, cuda_graph=True)
    with pytest.raises(TypeError, match="model"):
        generate(torch.nn.Linear(2, 2), prompt, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_matches_eager():
    lm = make(STACK, dtype=torch.float32).cuda()
    prompt = torch.randint(0, V, (2, 6), device="cuda")
    kw = dict(return_dict_in_generate=True)
    eager = generate(lm, prompt, 16, cuda_graph=False, **kw)
    graph = generate(lm, prompt, 16, cuda_graph=True, **kw)
    assert graph.cuda_graph and not eager.cuda_graph
    assert torch.equal(graph.sequences, eager.sequences)
    assert_greedy(lm, graph.sequences, 6)
    auto = generate(lm, prompt, 16, **kw)  # None: a graph on CUDA
    assert auto.cuda_graph and torch.equal(auto.sequences, eager.sequences)
    g1 = generate(
        lm,
        prompt,
        16,
        do_sample=True,
        top_k=5,
        generator=torch.Generator("cuda").manual_seed(3),
        cuda_graph=True,
    )
    g2 = generate(
        lm,
        prompt,
        16,
        do_sample=True,
        top_k=5,
        generator=torch.Generator("cuda").manual_seed(3),
        cuda_graph=False,
    )
    assert torch.equal(g1, g2)
    # padded prompts and scores under a graph: the replayed logits are copied, not aliased
    _, ids, mask = padded_prompts("left")
    ids, mask = ids.cuda(), mask.cuda()
    a = generate(lm, ids, 8, attention_mask=mask, output_scores=True, cuda_graph=True)
    b = generate(lm, ids, 8, attention_mask=mask, output_scores=True, cuda_graph=False)
    assert a.cuda_graph and torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores))


def test_sample_logits_checks_and_tiny_temperatures():
    """sample_logits checks its arguments as generate does; a temperature so small that
    logits / T overflows samples the argmax (no inf/NaN probabilities), in generate too."""
    from lrnnx.utils import sample_logits

    logits = torch.tensor([[10.0, 0.0, -10.0], [-3.0, 4.0, 1.0]])
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            sample_logits(logits, temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(logits, top_p=0.0)
    for t in (1e-30, 1e-45):
        assert torch.equal(sample_logits(logits, temperature=t), logits.argmax(-1))
    lm = make(["s5"], torch.float32)  # float32 logits: 10 / 1e-45 overflows
    prompt = torch.randint(0, V, (2, 3))
    greedy = generate(lm, prompt, 4)
    assert torch.equal(generate(lm, prompt, 4, do_sample=True, temperature=1e-45), greedy)
