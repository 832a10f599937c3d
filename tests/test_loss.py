"""The loss and the log-probs it is built on: exact gradient by enumeration, numerics at s ~ 0, masking."""

import itertools
from contextlib import nullcontext

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import online_sft
from online_sft import (
    SHORT_ATTENTION_SCORES,
    chunked_logprobs,
    cut_after_eos,
    generate,
    online_sft_loss,
    pack,
    rloo_baseline,
    sample_tokens,
    sequence_logprobs,
    use_short_attention,
)

EOS = 3  # tiny vocabulary {0, 1, 2, EOS}


def tiny_policy(seed: int, heads: int = 2, kv_heads: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # sharpen the random init so the policy is far from uniform
        model.lm_head.weight.mul_(20)
    return model


def all_responses(max_len: int) -> list[list[int]]:
    """Every response a sampler cut at the first EOS or at max_len tokens can produce."""
    out = []
    for k in range(max_len + 1):
        for body in itertools.product([0, 1, 2], repeat=k):
            out.append([*body] if k == max_len else [*body, EOS])
    return out


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_expected_gradient_equals_rlhf_gradient(beta):
    """sum_y pi(y) grad L(y) == -grad(E[r] - beta*KL(pi || pi_ref)), every response of a tiny policy enumerated."""
    policy, ref = tiny_policy(0), tiny_policy(1).requires_grad_(False)
    prompt = [1, 2, 0]
    responses = all_responses(3)  # 1 + 3 + 9 + 27 = 40 responses, probabilities summing to 1
    batch = [{"prompt": prompt, "response": r} for r in responses]
    input_ids, attention_mask, response_mask = pack(batch, pad_id=EOS)
    rewards = torch.linspace(-1.0, 2.0, len(responses), dtype=torch.float64)[torch.randperm(len(responses))]

    s = sequence_logprobs(policy, input_ids, attention_mask, response_mask)
    s_ref = sequence_logprobs(ref, input_ids, attention_mask, response_mask)
    pi = s.exp()
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-10)
    assert pi.min().item() > 1e-6  # every response carries weight in the check

    objective = (pi * (rewards - beta * (s - s_ref))).sum()  # E[r] - beta*KL, exactly
    exact = torch.autograd.grad(-objective, list(policy.parameters()), retain_graph=True)
    estimator = (pi.detach() * online_sft_loss(s, s_ref, rewards, beta)).sum()
    ours = torch.autograd.grad(estimator, list(policy.parameters()))
    exact, ours = torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in ours])
    assert exact.norm() > 1e-3
    assert ((ours - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_importance_weights_correct_for_samples_from_another_sampler(beta):
    """Responses drawn from mu (another policy, as vLLM's kernels or stale weights are): sum_y mu(y) rho(y) grad L(y)
    with rho = exp(s - s_mu) equals the exact RLHF gradient under pi; without rho it does not."""
    policy, ref, sampler = tiny_policy(0), tiny_policy(1).requires_grad_(False), tiny_policy(5).requires_grad_(False)
    prompt = [1, 2, 0]
    responses = all_responses(3)
    batch = [{"prompt": prompt, "response": r} for r in responses]
    input_ids, attention_mask, response_mask = pack(batch, pad_id=EOS)
    rewards = torch.linspace(-1.0, 2.0, len(responses), dtype=torch.float64)[torch.randperm(len(responses))]

    s = sequence_logprobs(policy, input_ids, attention_mask, response_mask)
    s_ref = sequence_logprobs(ref, input_ids, attention_mask, response_mask)
    s_mu = sequence_logprobs(sampler, input_ids, attention_mask, response_mask, temperature=2.0)  # full support
    pi, mu = s.exp(), s_mu.exp()
    assert mu.sum().item() == pytest.approx(1.0, abs=1e-10) and mu.min().item() > 1e-6
    assert (pi - mu).abs().sum().item() > 0.5  # a sampler far from the policy, so the weights matter

    params = list(policy.parameters())
    objective = (pi * (rewards - beta * (s - s_ref))).sum()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(-objective, params, retain_graph=True)])

    def estimate(importance_weight):
        loss = (mu * online_sft_loss(s, s_ref, rewards, beta, importance_weight=importance_weight)).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    # rho keeps its graph here: the loss must treat it as a constant for the gradient to come out exact
    weighted, unweighted = estimate((s - s_mu).exp()), estimate(None)
    assert exact.norm() > 1e-3
    assert ((weighted - exact).norm() / exact.norm()).item() < 1e-5
    assert ((unweighted - exact).norm() / exact.norm()).item() > 0.1
    # the default (None) is a weight of 1
    torch.testing.assert_close(estimate(torch.ones_like(s)), unweighted, rtol=0, atol=0)


def test_loss_value_matches_the_formula():
    s = torch.tensor([-3.0, -0.5, -12.0], dtype=torch.float64)
    s_ref = torch.tensor([-2.0, -0.7, -11.0], dtype=torch.float64)
    r, beta = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64), 0.1
    w = (r - beta * (s - s_ref)) / s
    expected = -(w * s + 0.5 * w * s**2)
    torch.testing.assert_close(online_sft_loss(s, s_ref, r, beta), expected)


@pytest.mark.parametrize("s0", [0.0, -1e-30, -1e-12, -1e-6, -5e-4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_is_finite_and_exact_at_tiny_s(s0, dtype):
    """Empty (s = 0) and near-certain responses: w = a/s is huge or infinite, yet loss and gradient stay exact."""
    s = torch.tensor([s0], dtype=dtype, requires_grad=True)
    s_ref = torch.tensor([-0.25], dtype=dtype)
    r, beta = torch.tensor([1.0], dtype=dtype), 0.05
    loss = online_sft_loss(s, s_ref, r, beta)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    expected_grad = -(r - beta * (s.detach() - s_ref) - beta)
    torch.testing.assert_close(s.grad, expected_grad, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_cut_after_eos_keeps_first_eos_and_nothing_after():
    responses = torch.tensor([[5, 6, EOS, 7, EOS], [EOS, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    ids, mask = cut_after_eos(responses, [EOS], pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ids.tolist() == [[5, 6, EOS, 0, 0], [EOS, 0, 0, 0, 0], [5, 6, 7, 8, 9]]
    _, mask = cut_after_eos(torch.tensor([[5, 9, 6]]), [EOS, 9], pad_id=0)  # any of several EOS ids
    assert mask.tolist() == [[1, 1, 0]]


def test_padding_and_tokens_after_eos_never_count():
    model = tiny_policy(2)
    prompt, response = [1, 0, 2, 2], [0, 1, EOS]
    alone = sequence_logprobs(model, *pack([{"prompt": prompt, "response": response}], pad_id=EOS))
    # left-padded prompt and right-padded response, batched with longer sequences
    batch = [{"prompt": prompt, "response": response}, {"prompt": [2] * 9, "response": [1] * 7}]
    left = sequence_logprobs(model, *pack(batch, pad_id=EOS))[0]
    # right padding: prompt and response contiguous at the start, padding at the end
    T = 16
    ids = torch.full((1, T), EOS)
    ids[0, : len(prompt) + len(response)] = torch.tensor(prompt + response)
    attention = torch.zeros((1, T), dtype=torch.long)
    attention[0, : len(prompt) + len(response)] = 1
    resp_mask = torch.zeros_like(attention)
    resp_mask[0, len(prompt) : len(prompt) + len(response)] = 1
    right = sequence_logprobs(model, ids, attention, resp_mask)[0]
    # garbage after the EOS (masked out) must not change s either
    ids_garbage = ids.clone()
    ids_garbage[0, len(prompt) + len(response) :] = 2
    garbage = sequence_logprobs(model, ids_garbage, attention, resp_mask)[0]
    for other in (left, right, garbage):
        torch.testing.assert_close(other, alone[0], rtol=1e-10, atol=1e-10)
    # and the value is the sum of the three next-token log-probs
    full = torch.tensor([prompt + response])
    logp = model(full).logits[0].log_softmax(-1)
    manual = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(response))
    torch.testing.assert_close(alone[0], manual.detach(), rtol=1e-10, atol=1e-10)


def test_logprobs_are_fp32_for_a_bf16_model():
    model = tiny_policy(3).to(torch.bfloat16)
    s = sequence_logprobs(model, *pack([{"prompt": [1, 2], "response": [0, EOS]}], pad_id=EOS))
    assert s.dtype == torch.float32


def test_temperature_scales_the_logits():
    model = tiny_policy(4)
    batch = pack([{"prompt": [1, 2], "response": [0, 1, EOS]}], pad_id=EOS)
    hot = sequence_logprobs(model, *batch, temperature=2.0)
    full = torch.tensor([[1, 2, 0, 1, EOS]])
    logp = (model(full).logits[0] / 2.0).log_softmax(-1)
    manual = logp[1, 0] + logp[2, 1] + logp[3, EOS]
    torch.testing.assert_close(hot[0], manual.detach(), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------------
# The leave-one-out (rloo) baseline


def expected_group_gradient(policy, ref, beta, group_size, baseline):
    """(sum over every group (y_1..y_G) of pi(y_1)...pi(y_G) * grad (1/G) sum_i L_i, exact gradient of
    -(E[r] - beta*KL)): the estimator's expectation over the joint distribution of a group, by enumeration."""
    prompt, responses = [1, 2, 0], all_responses(3)
    batch = [{"prompt": prompt, "response": r} for r in responses]
    input_ids, attention_mask, response_mask = pack(batch, pad_id=EOS)
    torch.manual_seed(5)
    rewards = torch.linspace(-1.0, 2.0, len(responses), dtype=torch.float64)[torch.randperm(len(responses))]
    s = sequence_logprobs(policy, input_ids, attention_mask, response_mask)
    s_ref = sequence_logprobs(ref, input_ids, attention_mask, response_mask)
    pi = s.exp()
    objective = (pi * (rewards - beta * (s - s_ref))).sum()
    exact = torch.autograd.grad(-objective, list(policy.parameters()), retain_graph=True)

    groups = torch.tensor(list(itertools.product(range(len(responses)), repeat=group_size)))  # (40^G, G)
    r = rewards[groups]
    b = baseline(r.flatten(), group_size).view_as(r)
    probability = pi.detach()[groups].prod(1, keepdim=True)  # the G samples are independent draws
    losses = online_sft_loss(s[groups], s_ref[groups], r - b, beta)  # (40^G, G)
    estimator = (probability * losses).sum() / group_size
    ours = torch.autograd.grad(estimator, list(policy.parameters()))
    return torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in exact])


@pytest.mark.parametrize("beta,group_size", [(0.0, 2), (0.3, 2), (0.3, 3)])
def test_rloo_expected_gradient_equals_rlhf_gradient(beta, group_size):
    """With the leave-one-out baseline inside w, the expected gradient over a whole group is still exactly
    -grad(E[r] - beta*KL): each sample's baseline comes from the other samples, drawn independently of it."""
    policy, ref = tiny_policy(0), tiny_policy(1).requires_grad_(False)
    ours, exact = expected_group_gradient(policy, ref, beta, group_size, rloo_baseline)
    assert exact.norm() > 1e-3
    assert ((ours - exact).norm() / exact.norm()).item() < 1e-5


def test_a_baseline_that_sees_its_own_sample_is_caught():
    """The check above can fail: the plain group mean (which includes the sample itself) biases the gradient."""

    def group_mean(rewards, group_size):
        return rewards.view(-1, group_size).mean(1, keepdim=True).expand(-1, group_size).flatten()

    policy, ref = tiny_policy(0), tiny_policy(1).requires_grad_(False)
    ours, exact = expected_group_gradient(policy, ref, 0.3, 2, group_mean)
    assert ((ours - exact).norm() / exact.norm()).item() > 1e-2


def test_rloo_baseline_is_the_mean_of_the_others():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 3.0])
    torch.testing.assert_close(rloo_baseline(rewards, 3), torch.tensor([-1.0, 0.0, 0.0, 1.5, 2.0, 0.5]))


# ----------------------------------------------------------------------------------------------------------------------
# Chunked log-probs, shared prompts and the sampler


def test_chunked_logprobs_equal_the_plain_computation_without_its_memory():
    """A long response (2048 positions) and a large vocabulary (49152, SmolLM2's): values and gradients equal the
    full-vocabulary log_softmax, while what the backward keeps does not grow with positions x vocabulary."""
    torch.manual_seed(0)
    n, vocab, hidden_size, temperature = 2048, 49152, 16, 0.7
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 4).requires_grad_()
    targets = torch.randint(vocab, (n,))
    upstream = torch.randn(n)

    saved_bytes = []

    def pack_hook(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        chunked = chunked_logprobs(hidden, weight, targets, temperature, chunk_size=256)
    grads = torch.autograd.grad((chunked * upstream).sum(), [hidden, weight])
    assert sum(saved_bytes) < 2 * (hidden.numel() + weight.numel()) * 4  # the inputs, no (n, vocab) logits

    plain = (hidden @ weight.T / temperature).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), [hidden, weight])
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for ours, expected in zip(grads, plain_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(attention):
    """group_size > 1 runs each group as one sequence, its prompt once, under a mask: same s and same gradient as
    running every row in full, with prompts of different lengths (left padding) and responses of different lengths
    (right padding), under both attention implementations that take the mask (a boolean one, an additive one)."""
    model = tiny_policy(6)
    torch.manual_seed(1)
    batch = []
    for prompt in ([1, 0, 2, 2, 1], [2, 1], [0, 0, 1, 2]):
        for length in (1, 4, 2):
            batch.append({"prompt": prompt, "response": torch.randint(3, (length - 1,)).tolist() + [EOS]})
    packed = pack(batch, pad_id=EOS)
    full = sequence_logprobs(model, *packed)
    full_grad = torch.autograd.grad(full.square().sum(), list(model.parameters()))
    # against SDPA's full rows: eager's own padding mask gives NaN gradients in fp64 (a left pad sees only -inf)
    model.set_attn_implementation(attention)
    shared = sequence_logprobs(model, *packed, group_size=3, chunk_size=2)
    shared_grad = torch.autograd.grad(shared.square().sum(), list(model.parameters()))
    tolerance = 1e-10 if attention == "sdpa" else 1e-6  # eager attention takes its softmax in fp32
    torch.testing.assert_close(shared, full, rtol=tolerance, atol=tolerance)
    # Llama's RMSNorm runs in fp32 even in an fp64 model, and the shared prompt's gradient is summed over its run
    # before that norm's backward instead of after: the two agree to fp32 rounding, not fp64's.
    shared_grad, full_grad = torch.cat([g.flatten() for g in shared_grad]), torch.cat([g.flatten() for g in full_grad])
    assert ((shared_grad - full_grad).norm() / full_grad.norm()).item() < 1e-6


@pytest.mark.parametrize("group_size", [1, 3])
def test_short_attention_gives_sdpa_logprobs_and_gradients(group_size, monkeypatch):
    """short_attention (plain matmuls for a small layer) against SDPA: same s and gradient, with grouped-query heads,
    on left-padded rows (whose pads have nothing to attend to: they must not turn into NaN) and on packed groups;
    above its size limit it hands the layer to SDPA."""
    import transformers.integrations.sdpa_attention as sdpa_module

    calls, sdpa = [], sdpa_module.sdpa_attention_forward
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = tiny_policy(7, heads=4, kv_heads=2)  # two key/value heads, each shared by two query heads
    torch.manual_seed(2)
    batch = [
        {"prompt": prompt, "response": torch.randint(3, (length - 1,)).tolist() + [EOS]}
        for prompt in ([1, 0, 2, 2, 1], [2, 1])
        for length in (3, 1, 5)
    ]
    packed = pack(batch, pad_id=EOS)

    def logprobs_and_gradient():
        s = sequence_logprobs(model, *packed, group_size=group_size)
        grad = torch.autograd.grad(s.square().sum(), list(model.parameters()))
        return s, torch.cat([g.flatten() for g in grad])

    expected, expected_grad = logprobs_and_gradient()
    use_short_attention(model)
    for limit, handed_over in ((SHORT_ATTENTION_SCORES, False), (0, True)):
        monkeypatch.setattr(online_sft, "SHORT_ATTENTION_SCORES", limit)
        calls.clear()
        s, grad = logprobs_and_gradient()
        assert bool(calls) == handed_over
        torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-6)  # its softmax runs in fp32
        assert ((grad - expected_grad).norm() / expected_grad.norm()).item() < 1e-6


def test_sample_tokens_draws_from_the_softmax_and_the_nucleus():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(200_000, -1)
    for top_p in (1.0, 0.8):
        probs = (logits[0] / 0.5).softmax(-1)
        if top_p < 1:  # the nucleus: the likeliest tokens until their mass reaches 0.8, renormalised
            keep = (probs.cumsum(0) - probs) < top_p
            probs = probs * keep / (probs * keep).sum()
        tokens = sample_tokens(logits, 0.5, top_p)
        frequency = torch.bincount(tokens, minlength=5).double() / len(tokens)
        assert frequency[4] == 0 and (top_p == 1 or frequency[probs == 0].sum() == 0)
        tolerance = 5 * (probs * (1 - probs) / len(tokens)).sqrt() + 1e-9  # 5 standard errors
        assert ((frequency - probs.double()).abs() <= tolerance).all(), (frequency, probs)


def test_generate_samples_exactly_the_policy():
    """Every response's frequency among many samples matches pi(y) = exp(s) from sequence_logprobs, at temperature
    0.8; the num_samples rows of one prompt are independent draws."""
    model = tiny_policy(0).float()
    prompt, responses, temperature, draws = [1, 2, 0], all_responses(3), 0.8, 4000
    batch = [{"prompt": prompt, "response": r} for r in responses]
    with torch.no_grad():
        pi = sequence_logprobs(model, *pack(batch, pad_id=EOS), temperature=temperature).double().exp()
    torch.manual_seed(0)
    ids, mask = generate(
        model,
        [prompt] * 10,
        pad_id=EOS,
        eos_ids=[EOS],
        max_new_tokens=3,
        temperature=temperature,
        top_p=1.0,
        greedy=False,
        autocast=nullcontext(),
        num_samples=draws // 10,
    )
    index = {tuple(r): i for i, r in enumerate(responses)}
    counts = torch.zeros(len(responses), dtype=torch.float64)
    for row, m in zip(ids.tolist(), mask.tolist()):
        counts[index[tuple(row[: sum(m)])]] += 1
    frequency = counts / draws
    tolerance = 5 * (pi * (1 - pi) / draws).sqrt() + 1e-3
    assert ((frequency - pi).abs() <= tolerance).all()
    assert len(set(map(tuple, ids[:10].tolist()))) > 1  # samples of one prompt differ


def test_greedy_generate_shares_the_prompt_without_changing_the_result():
    model = tiny_policy(7).float()
    prompts = [[1, 2, 0, 1], [2], [0, 1]]
    kw = {"pad_id": EOS, "eos_ids": [EOS], "max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0}
    kw |= {"greedy": True, "autocast": nullcontext()}
    shared_ids, shared_mask = generate(model, prompts, num_samples=2, **kw)
    one_by_one = [generate(model, [p], **kw) for p in prompts for _ in range(2)]
    for i, (ids, mask) in enumerate(one_by_one):
        n = int(mask.sum())
        assert shared_mask[i].sum() == n and shared_ids[i, :n].tolist() == ids[0, :n].tolist()
