# bilevel data selection over preference pairs on the shipped toy data (CPU, about a minute):
# dataset_1 is a small set of clean pairs (chosen "RED FOX!", rejected "RED FOX"), dataset_2 a
# noisy set with 30% of its pairs swapped; one logit per pair of dataset_2, judged by the DPO loss
# on dataset_1. The DPO reference of both is the initial policy, so every pair's loss starts at ln 2;
# the policy learns the majority order within a few steps, and from then on the swapped pairs' losses
# stand out. Writes selector.jsonl and selected.jsonl.
out_dir = "out/demo/select_pairs"
method = "select"
obj_1 = "dpo"
obj_2 = "dpo"
dataset_1 = "data/toy_pref_trusted.jsonl"
dataset_2 = "data/toy_pref_noisy.jsonl"
selector_labels = "data/toy_pref_noisy_labels.jsonl"  # for the summary only
max_len_1 = max_len_2 = 48
model_n_layer = 2
model_n_embd = 64
model_intermediate_size = 176
dpo_beta = 0.1
train_batch_size = 64  # few steps per epoch: Adam drifts unvisited logits, visits carry the signal
micro_train_batch_size = 32
learning_rate = 3e-3
selector_learning_rate = 5e-2
selector_activation = "softmax"
upperlevel_weight = 0.5
upperlevel_weight_decay = 0.1
select_ratio = 0.7
max_epochs = 10
eval_interval = 0
log_interval = 10
