"""The phases main() calls, one at a time: what a researcher who changes one of them relies on."""

import torch

from online_sft import Args, Reward, keep_groups, with_task_defaults


def test_keep_groups_keeps_whole_groups_up_to_room_and_drops_equal_ones():
    args = with_task_defaults(Args(num_generations=2, filter_groups=True, baseline="rloo"))
    prompts = [[1], [1], [2], [2], [3], [3], [4], [4]]
    ids = torch.tensor([[5, 6], [5, 0], [7, 7], [7, 7], [8, 0], [9, 9], [4, 0], [4, 4]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 1], [1, 0], [1, 1]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    batch, counts = [], {}
    filler = keep_groups(args, prompts, (ids, mask, None), rewards, rewards.clone(), batch, 4, counts)
    # group 1 (rewards all equal) is dropped; groups 0 and 2 fill the room of 4; group 3 only generated
    assert [x["response"] for x in batch] == [[5, 6], [5], [8], [9, 9]]
    assert [x["prompt"] for x in batch] == [[1], [1], [3], [3]]
    assert [x["baseline"].item() for x in batch] == [0.0, 1.0, 2.0, 0.0]  # leave-one-out: the other sample's reward
    assert counts == {"filter/groups_dropped": 1}
    assert [x["response"] for x in filler] == [[4], [4, 4]]  # the last group, for a rank with nothing kept


def test_reward_scores_format_and_overlong_in_one_place():
    args = with_task_defaults(Args(task="arith", num_generations=2, apply_overlong_penalty=True, response_length=4,
                                   overlong_buffer_len=2, overlong_penalty_factor=1.0))  # fmt: skip

    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return ["12", "so 13"]

    reward = Reward(args, Tok(), None, eos_ids=[0])
    counts = {}
    ids, mask = torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    rewards, correct = reward([{"answer": "12"}], [[1], [1]], ids, mask, counts, step=1)
    assert correct.tolist() == [1.0, 0.0]
    # the second response fills response_length: DAPO's penalty at its full factor
    assert rewards.tolist() == [args.correct_reward, args.incorrect_reward - 1.0]
    assert counts == {"reward/no_answer": 0}
