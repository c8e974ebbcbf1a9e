"""
Writes the toy datasets of data/ (deterministic, standard library only):
    python data/make_toy.py
A prompt is one short lowercase word (a quarter of the rows) or two. SFT answers it in UPPERCASE
and stops; the preference data prefers the same answer with an exclamation mark ("RED FOX!")
over the plain SFT answer ("RED FOX"), so DPO pushes down exactly what SFT teaches (the end of
the answer) while agreeing on the rest: a real trade-off, and sequential training forgets. The noisy SFT set has
30% of its answers replaced by random letters; which rows is written only to the labels file. The
noisy preference set has 30% of its pairs swapped (chosen and rejected exchanged), likewise labelled.
With the template "User: {}\nAssistant: " every prompt + response is at most 48 bytes.
"""
import json
import os
import random

WORDS = """
apple arm art baby back bag ball band bank barn base bath bead beam bean bear bed bee bell belt
bench berry big bike bird black blade blue boat body bone book boot bowl box boy brave bread brick
bride bright brush bulb cake calm camel camp candy cap car card cart cat cave chair chalk cheek
chess chin city clay cliff clock cloud coal coat coin cold comb cook cool corn cow crab crow crown
cup dark deer desk dish dog doll door dove dream dress drum dry duck dust eagle ear earth egg elbow
empty fan farm fence field fig fish flag flame flute fog foot fork fox fresh frog fruit full gate
gift glass glove goat gold grape grass green gull hair hand happy harp hat hawk heart heavy hen
hill hole honey hoof horn horse house ice ink iron jam jar jelly jet juice kettle key king kite
knee knife lake lamp leaf leg lemon lid light lily lime lion lip lock log loud map mask meat milk
mint moon moss moth mouse mud nail neck nest net new night nose nut oak oar ocean old olive onion
owl pan paper park path peach pear pen pig pike pine pipe plain plant plate plum pond pot proud
pump queen quick quiet quilt rain rat red reed rice rich ring river road rock roof room rope rose
round ruby sad sail salt sand seal seed sharp sheep shell ship shoe shy silk sink skirt sky sled
slow small snail snake snow soap sock soft soup sour spoon star steam stem stone stool storm straw
sugar sun swan sweet table tail tall tea tent thin tiger tiny toad toe tooth towel tower town toy
train tree truck tulip van vase vine wall warm wasp water wave wax wet whale wheat wheel whip wide
wild wind wing wolf wood wool worm yard yarn young zebra zoo
""".split()

def make(seed=0):
    """{file name: rows} of every toy file."""
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    assert all(len(w) <= 7 for w in words)
    pairs = [f"{a} {b}" for a, b in rng.sample([(a, b) for a in words for b in words if a != b], 5000)]
    rng.shuffle(words)
    # eval prompts never appear as a training row (their words do, inside other prompts)
    eval_singles, singles, eval_pairs, pairs = words[:100], words[100:], pairs[:300], pairs[300:]

    def draw(n, singles, pairs, repeat=True, r=rng):  # a quarter single words, the rest distinct pairs
        k = n // 4
        out = [r.choice(singles) for _ in range(k)] if repeat else r.sample(singles, k)
        out += r.sample(pairs, n - k)
        r.shuffle(out)
        return out

    sft = lambda p: {"input": p, "output": p.upper()}
    pref = lambda p: {"prompt": p, "chosen": p.upper() + "!", "rejected": p.upper()}
    sft_eval = draw(200, eval_singles[:50], eval_pairs[:150], repeat=False)
    pref_eval = draw(200, eval_singles[50:], eval_pairs[150:], repeat=False)
    clean = draw(1200, singles, pairs)
    trusted, noisy = [sft(p) for p in clean[:200]], [sft(p) for p in clean[200:]]
    corrupted = set(rng.sample(range(len(noisy)), len(noisy) * 3 // 10))
    for i in sorted(corrupted):
        answer = noisy[i]["output"]
        while answer == noisy[i]["output"]:  # random letters, spaces kept in place
            answer = "".join(c if c == " " else rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for c in noisy[i]["output"])
        noisy[i]["output"] = answer
    files = {
        "toy_sft.jsonl": [sft(p) for p in draw(2000, singles, pairs)],
        "toy_sft_eval.jsonl": [sft(p) for p in sft_eval],
        "toy_pref.jsonl": [pref(p) for p in draw(2000, singles, pairs)],
        "toy_pref_eval.jsonl": [pref(p) for p in pref_eval],
        "toy_trusted.jsonl": trusted,
        "toy_noisy.jsonl": noisy,
        "toy_noisy_labels.jsonl": [{"id": i, "corrupted": i in corrupted} for i in range(len(noisy))],
    }
    # a third objective (drawn after the rest, which stay as they were): prefer a period over the
    # exclamation mark ("RED FOX." over "RED FOX!"): it conflicts with toy_pref and with the SFT answer
    calm = lambda p: {"prompt": p, "chosen": p.upper() + ".", "rejected": p.upper() + "!"}
    files["toy_calm.jsonl"] = [calm(p) for p in draw(1000, singles, pairs)]
    files["toy_calm_eval.jsonl"] = [calm(p) for p in draw(200, eval_singles[50:], eval_pairs[150:], repeat=False)]
    # preference pairs to select from (drawn by a generator of their own, so every file above stays
    # as it was): a clean trusted set, and a noisy set with 30% of its pairs swapped (chosen = the
    # plain answer, rejected = the one with "!"); which pairs is written only to the labels file
    prng = random.Random(seed + 1)
    clean = draw(1200, singles, pairs, r=prng)
    noisy = [pref(p) for p in clean[200:]]
    swapped = set(prng.sample(range(len(noisy)), len(noisy) * 3 // 10))
    for i in swapped:
        noisy[i]["chosen"], noisy[i]["rejected"] = noisy[i]["rejected"], noisy[i]["chosen"]
    files["toy_pref_trusted.jsonl"] = [pref(p) for p in clean[:200]]
    files["toy_pref_noisy.jsonl"] = noisy
    files["toy_pref_noisy_labels.jsonl"] = [{"id": i, "corrupted": i in swapped} for i in range(len(noisy))]
    # online objectives (grpo), by generators of their own: prompts "whisper <words>" whose reward
    # (rewards.char_match) wants the words back in lowercase, the opposite of the SFT answers; and integer
    # arithmetic with its answer in a column (rewards.exact_answer)
    wrng = random.Random(seed + 2)
    whisper = lambda p: {"prompt": "whisper " + p, "answer": p}
    files["toy_whisper.jsonl"] = [whisper(p) for p in draw(1000, singles, pairs, r=wrng)]
    files["toy_whisper_eval.jsonl"] = [
        whisper(p) for p in draw(200, eval_singles[:50], eval_pairs[:150], repeat=False, r=wrng)
    ]
    arng = random.Random(seed + 3)
    def arith(n):
        rows = []
        for _ in range(n):
            a, b, op = arng.randint(0, 99), arng.randint(0, 99), arng.choice("+-*")
            b = b % 13 if op == "*" else b
            rows.append({"prompt": f"What is {a} {op} {b}?", "answer": str(eval(f"{a}{op}{b}"))})
        return rows
    files["toy_arith.jsonl"], files["toy_arith_eval.jsonl"] = arith(2000), arith(200)
    return files

def write(out_dir=os.path.dirname(os.path.abspath(__file__))):
    for name, rows in make().items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} rows")

if __name__ == "__main__":
    write()
