# the shipped toy trade-off on CPU (demo.py runs this with every method): a tiny byte-level llama
# trained from scratch. objective 1 = SFT (answer a word in UPPERCASE), objective 2 = DPO
# (prefer the answer with '!' over the plain SFT answer): they conflict, so training one alone
# undoes the other. python train.py config/demo.py --method=mix
out_dir = "out/demo/alright"
obj_1 = "sft"
obj_2 = "dpo"
method = "alright"
lambd = 0.5
dataset_1 = "data/toy_sft.jsonl"
eval_split_1 = "data/toy_sft_eval.jsonl"
dataset_2 = "data/toy_pref.jsonl"
eval_split_2 = "data/toy_pref_eval.jsonl"
max_len_1 = max_len_2 = 48
model_n_layer = 2
model_n_embd = 64
model_n_head = 4
model_n_kv_head = 2
model_intermediate_size = 176
train_batch_size = 16
micro_train_batch_size = 16
learning_rate = 1e-3
dpo_beta = 0.1
max_iters = 300          # 2.4 epochs of each dataset
eval_interval = 25
eval_iters = 4           # 64 held-out rows per objective
log_interval = 10
