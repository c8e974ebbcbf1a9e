# plain SFT on the rows a selection run kept (config/select.py writes selected.jsonl).
# A selector trained with a small model can pick data for a larger one: change pretrain freely.
out_dir = "out/sft_selected"
pretrain = "EleutherAI/pythia-1b"
lora_rank = 16
lora_alpha = 16
target_modules = "query_key_value"
obj_1 = "sft"
dataset_1 = "out/select_pythia1b/selected.jsonl"
input_key = "instruction"
output_key = "output"
train_batch_size = 16
micro_train_batch_size = 1
learning_rate = 1e-5
max_epochs = 3
zero_stage = 2
dtype = "bfloat16"
gradient_checkpointing = True
