# bilevel data selection on the shipped toy data (CPU, about a minute): dataset_1 is the small
# trusted set, dataset_2 the noisy set to filter; writes selector.jsonl and selected.jsonl.
# The original tool's Pythia-1b / OpenOrca / alpaca-cleaned recipe is config/select.py.
out_dir = "out/demo/select"
method = "select"
obj_1 = "sft"
obj_2 = "sft"
dataset_1 = "data/toy_trusted.jsonl"
dataset_2 = "data/toy_noisy.jsonl"
selector_labels = "data/toy_noisy_labels.jsonl"  # for the summary only
max_len_1 = max_len_2 = 48
model_n_layer = 2
model_n_embd = 64
model_intermediate_size = 176
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
