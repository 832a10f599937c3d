"""The loss and the log-probs it is built on: exact gradient by enumeration, numerics at s ~ 0, masking."""

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from online_sft import cut_after_eos, online_sft_loss, pack, sequence_logprobs

EOS = 3  # tiny vocabulary {0, 1, 2, EOS}


def tiny_policy(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
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
