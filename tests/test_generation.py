"""generate(): greedy == argmax of the full forward, top-k/top-p filters, eos, one parallel
prefill, CUDA graphs."""

import pytest
import torch

from lrnnx.architectures import LRNNLMHeadModel
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


def assert_greedy(lm, seq, L):
    """Every generated token is the argmax of the full forward over the sequence before it."""
    with torch.no_grad():
        logits = lm(seq[:, :-1])
    torch.testing.assert_close(logits[:, L - 1 :].argmax(-1), seq[:, L:], rtol=0, atol=0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_equals_argmax_of_forward(mixer):
    lm = make([mixer, "attn"] if mixer != "attn" else ["attn", "attn"])
    prompt = torch.randint(0, V, (2, 5))
    out = generate(lm, prompt, max_new_tokens=8, temperature=0)
    assert isinstance(out, GenerationOutput)
    assert out.sequences.shape == (2, 13) and out.num_new_tokens == 8
    assert torch.equal(out.sequences[:, :5], prompt)
    assert_greedy(lm, out.sequences, 5)
    assert out.tokens_per_s > 0 and out.prefill_s > 0 and out.decode_s >= 0
    assert not out.cuda_graph


def test_top_k_one_is_greedy_and_generator_reproducible():
    lm = make(STACK)
    prompt = torch.randint(0, V, (3, 4))
    greedy = generate(lm, prompt, 6, temperature=0).sequences
    assert torch.equal(generate(lm, prompt, 6, temperature=1.3, top_k=1).sequences, greedy)
    a = generate(lm, prompt, 6, generator=torch.Generator().manual_seed(7)).sequences
    b = generate(lm, prompt, 6, generator=torch.Generator().manual_seed(7)).sequences
    assert torch.equal(a, b)


def test_prefill_is_one_parallel_forward_then_steps():
    lm = make(STACK)
    calls = {"forward": [], "step": 0}
    lm.register_forward_pre_hook(
        lambda m, args, kwargs: calls["forward"].append(args[0].shape), with_kwargs=True
    )
    step = lm.step

    def counting_step(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    lm.step = counting_step
    lm.train()
    generate(lm, torch.randint(0, V, (2, 7)), max_new_tokens=5, temperature=0)
    assert calls["forward"] == [torch.Size([2, 7])] and calls["step"] == 4
    assert lm.training  # the mode is restored


def test_sampled_tokens_respect_top_k():
    lm = make(STACK)
    prompt = torch.randint(0, V, (4, 3))
    g = torch.Generator().manual_seed(0)
    seq = generate(lm, prompt, 12, temperature=2.0, top_k=3, generator=g).sequences
    with torch.no_grad():
        logits = lm(seq[:, :-1])[:, 2:]
    allowed = logits.topk(3, -1).indices
    assert (allowed == seq[:, 3:, None]).any(-1).all()
    assert not (logits.argmax(-1) == seq[:, 3:]).all()  # it did sample, not just take argmax


def test_sampled_tokens_respect_top_p():
    lm = make(STACK)
    prompt = torch.randint(0, V, (4, 3))
    g = torch.Generator().manual_seed(1)
    top_p, temp = 0.6, 1.5
    seq = generate(lm, prompt, 12, temperature=temp, top_p=top_p, generator=g).sequences
    with torch.no_grad():
        probs = (lm(seq[:, :-1])[:, 2:] / temp).softmax(-1)
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


def test_eos_stops_sequences_and_pads():
    lm = make(STACK)
    prompt = torch.randint(0, V, (3, 4))
    greedy = generate(lm, prompt, 10, temperature=0).sequences
    eos = int(greedy[0, 4 + 2])  # the third token of sequence 0
    pad = (eos + 1) % V
    out = generate(lm, prompt, 10, temperature=0, eos_token_id=eos, pad_token_id=pad)
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
    single = generate(lm, prompt[:1], 10, temperature=0, eos_token_id=eos)
    assert single.sequences.shape == (1, 4 + expected_stop[0])  # stops early when all finished
    assert int(single.sequences[0, -1]) == eos


def test_zero_new_tokens_and_errors():
    lm = make(["s5"])
    prompt = torch.randint(0, V, (2, 3))
    out = generate(lm, prompt, 0)
    assert torch.equal(out.sequences, prompt) and out.num_new_tokens == 0
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(lm, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(lm, prompt, 2, top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, prompt, -1)
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
    eager = generate(lm, prompt, 16, temperature=0, cuda_graph=False)
    graph = generate(lm, prompt, 16, temperature=0, cuda_graph=True)
    assert graph.cuda_graph and not eager.cuda_graph
    assert torch.equal(graph.sequences, eager.sequences)
    assert_greedy(lm, graph.sequences, 6)
    auto = generate(lm, prompt, 16, temperature=0)  # None: a graph on CUDA
    assert auto.cuda_graph and torch.equal(auto.sequences, eager.sequences)
    g1 = generate(
        lm, prompt, 16, top_k=5, generator=torch.Generator("cuda").manual_seed(3), cuda_graph=True
    )
    g2 = generate(
        lm, prompt, 16, top_k=5, generator=torch.Generator("cuda").manual_seed(3), cuda_graph=False
    )
    assert torch.equal(g1.sequences, g2.sequences)
