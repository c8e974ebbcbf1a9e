"""checks.py: refusals of key combinations, in process (what train.py runs before anything loads):
each names the key; what a run may set passes."""
import pytest

import checks
from errors import ConfigError
from helpers import check_config, train_defaults

GRPO_2 = dict(obj_2="grpo", dataset_2="data/toy_whisper.jsonl", reward_fn_2="lowercase", micro_train_batch_size=4)

def config(**over):
    c, per = train_defaults(
        **{"dataset_1": "data/toy_sft.jsonl", "dataset_2": "data/toy_pref.jsonl", "obj_2": "dpo", **over}
    )
    return c, per

def refusal(**over):
    c, per = config(**over)
    with pytest.raises(ConfigError) as e:
        check_config(c, per)
    return str(e.value)

@pytest.mark.parametrize("over,words", [
    (dict(method="constrained", budget_1=0.1, budget_3=0.2), ["budget_3", "2 objective(s)"]),
    (dict(method="constrained", budget_1=0.1, obj_2=""), ["budget_1", "one objective"]),
    (dict(reward_fn_2="lowercase"), ["reward_fn_2", "objective 2 is dpo", "grpo"]),
    (dict(num_generations_2=8), ["num_generations_2", "dpo", "grpo"]),
    (dict(kd_loss_1="reverse"), ["kd_loss_1", "objective 1 is sft", "kd"]),
    (dict(obj_opt_1=-1.0, method="maxright"), ["obj_opt_1", "losses >= 0", "-1.0"]),
    (dict(method="constrained", budget_1=0.0), ["budget_1=0", "> 0"]),
    (dict(method="constrained", budget_1=0.2, eval_frac=0.0), ["budget_1", "no eval set"]),
])
def test_refused(over, words):
    msg = refusal(**over)
    for w in words:
        assert w in msg, (w, msg)

@pytest.mark.parametrize("over", [
    dict(dpo_beta_2=0.2),                                            # its own kind's key
    dict(obj_2="simpo", dpo_beta_2=2.0, dpo_label_smoothing_2=0.1),  # a key several kinds declare
    dict(obj_2="kto", dpo_beta_2=0.2),
    dict(dpo_beta=0.2, kd_loss="reverse"),                           # unsuffixed: every objective's default
    dict(obj_2="kd", ref_model_2="x", max_new_tokens_2=8),           # an online key kd shares with grpo
    dict(GRPO_2, obj_opt_2=-0.5, method="maxright", obj_opt_1=0.2),  # minus a reward: f* below 0 is a value
    dict(GRPO_2, obj_opt_2=-1.0, method="maxright", obj_opt_1=0.2),  # -1 is a value too, not "estimate"
    dict(method="constrained", budget_1=0.3),
])
def test_accepted(over):
    c, per = config(**over)
    check_config(c, per)
