# SFT + GRPO in one run (Qwen2.5-0.5B-Instruct, LoRA): SFT on alpaca-gpt4 keeps the assistant's
# instruction following while GRPO trains verifiable math (NuminaMath-TIR problems; the reward is
# 1 when the completion's final answer, its last \boxed{} or number, equals the solution's). RL
# after SFT loses the SFT behaviour; ALRIGHT trains both at the cost of one. GRPO runs with DAPO's settings
# (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, overlong reward shaping.
# torchrun --nproc_per_node=8 train.py config/sft_grpo.py --method=alright --lambd=0.3
out_dir = "out/qwen05b-sft-grpo"
pretrain = "Qwen/Qwen2.5-0.5B-Instruct"
lora_rank = 16
lora_alpha = 32
target_modules = "all-linear"
method = "alright"
lambd = 0.3
obj_1 = "sft"
dataset_1 = "vicgalle/alpaca-gpt4"
input_key_1 = "instruction"
output_key_1 = "output"
obj_2 = "grpo"
dataset_2 = "AI-MO/NuminaMath-TIR"  # columns problem, solution (its \boxed{} answer)
eval_split_2 = "test"
prompt_key_2 = "problem"
reward_fn_2 = "exact_answer,overlong"  # rewards.py; or 'my_rewards.py:fn'; summed with reward_weights_2
reward_weights_2 = "1,1"
overlong_buffer_2 = 128            # DAPO's soft overlong punishment: 0 up to 384 tokens, then down to -1 at 512
num_generations_2 = 8
max_new_tokens_2 = 512
temperature_2 = 1.0
grpo_beta_2 = 0.0                  # no reference model; > 0 adds the k3 KL to the base (adapters off)
# DAPO: clip-higher, dynamic sampling, the token mean over the batch (grpo_loss_2 = "token", the default)
grpo_epsilon_2 = 0.2
grpo_epsilon_high_2 = 0.28         # the upper clip bound 1.28: low-probability tokens may rise further
dynamic_sampling_2 = True          # groups all right or all wrong teach nothing: drop them, sample more prompts
max_resample_2 = 4                 # at most 4 extra rollouts per step, then train on the groups there are
apply_chat_template = True
learning_rate = 1e-5
lr_scheduler = "cosine"
warmup_ratio = 0.05
train_batch_size = 64              # completions per step: 8 prompts x 8 completions
micro_train_batch_size = 8
max_len_1 = 1024
max_len_2 = 1024
max_iters = 500
eval_max_samples_2 = 128
dtype = "bfloat16"
gradient_checkpointing = True
eval_interval = 50
eval_iters = 4
