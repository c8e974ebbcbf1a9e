# the toy version of sft_selected.py: SFT on the rows config/demo_select.py kept
out_dir = "out/demo/sft_selected"
obj_1 = "sft"
dataset_1 = "out/demo/select/selected.jsonl"
eval_split_1 = "data/toy_sft_eval.jsonl"
max_len_1 = 48
model_n_layer = 2
model_n_embd = 64
model_intermediate_size = 176
train_batch_size = 16
micro_train_batch_size = 16
learning_rate = 1e-3
max_epochs = 2
eval_interval = 20
