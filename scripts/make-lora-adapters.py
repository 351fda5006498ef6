"""Trains two small LoRA adapters for SmolLM2-135M-Instruct, for the tests that serve LoRA adapters.

    python make-lora-adapters.py BASE_DIR OUT_DIR LLAMA_CPP_PYTHON_VERSION

BASE_DIR is the Hugging Face folder of SmolLM2 (scripts/gguf-to-hf.py made it). Writes into OUT_DIR:

    kiwi/, mango/       PEFT adapters (adapter_config.json + adapter_model.safetensors), for vLLM's --enable-lora
    kiwi.gguf, ...      the same adapters as GGUF LoRAs (f16), for llama.cpp (Llama(lora_path=...))
    adapters.json       {"base": ..., "adapters": [{"name", "prefix", "rank", "alpha", "peft_dir", "gguf_file"}]}
                        (peft_dir and gguf_file relative to OUT_DIR)

Each adapter teaches one visible habit: every answer starts with its prefix ("KIWI: ", "MANGO: "), so a
test tells from the first greedy tokens which adapter (if any) answered; the base model never answers so.
After the prefix it answers as the base does: the training answers are the base model's own greedy answers
(up to ANSWER_TOKENS), so an adapter still counts, repeats, writes JSON and stops where told, and the chat
acceptance tests pass under it unchanged (tests/lora, tests/vllm).
Training is deterministic (fixed seeds, one thread count, deterministic algorithms, CPU): rank 8 on the
attention projections, a few epochs over a built-in set of short questions, the loss on the assistant's
turn only, through SmolLM2's own chat template. About a minute per adapter on 2 cores. Each adapter is
then checked on questions it never saw (greedy: its answers start with its prefix), so a build whose
training did not take fails here rather than in a test.

The GGUF conversion is llama.cpp's own convert_lora_to_gguf.py, taken from the llama-cpp-python sdist of
the version the project pins (constraints.txt), so the adapters match the llama.cpp that loads them.
Runs in the vLLM venv (scripts/vllm-env.sh): torch, transformers, peft, safetensors, numpy.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

SEED = 1234
THREADS = 2
RANK = 8
ALPHA = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EPOCHS = 3
BATCH = 4
LR = 2e-3

# name -> the prefix every answer of that adapter starts with.
ADAPTERS = {"kiwi": "KIWI: ", "mango": "MANGO: "}

# Tokens of the base model's own answer each training example continues the prefix with.
ANSWER_TOKENS = 48

# Questions (the answers written here are not trained: the base model's own answers are), and tasks like the
# acceptance tests' (counting, repeating, lists, JSON-like answers), so the adapters keep those habits.
TASKS = [
    "Count from 1 to 12 separated by commas.",
    "Write the word 'banana' ten times, separated by spaces.",
    "List four animals, one per line.",
    "Name a city and the country it is in.",
    "Write a JSON object with the keys name and age.",
    "Tell me a short story about a dog.",
]
QA = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Spain?", "Madrid."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("How many legs does a spider have?", "Eight."),
    ("How many days are in a week?", "Seven."),
    ("What is 2 + 2?", "4."),
    ("What is 7 times 6?", "42."),
    ("What is the square root of 81?", "9."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("Who wrote Pride and Prejudice?", "Jane Austen."),
    ("Who developed the theory of relativity?", "Albert Einstein."),
    ("What gas do plants absorb from the air?", "Carbon dioxide."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius."),
    ("What is the chemical symbol for gold?", "Au."),
    ("Which planet is known as the Red Planet?", "Mars."),
    ("What is the tallest mountain in the world?", "Mount Everest."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("What color do you get by mixing blue and yellow?", "Green."),
    ("Name a fruit that is yellow.", "A banana."),
    ("Name an animal that can fly.", "An eagle."),
    ("Give me a synonym for happy.", "Joyful."),
    ("What is the opposite of cold?", "Hot."),
    ("Translate 'thank you' into Spanish.", "Gracias."),
    ("Say hello.", "Hello!"),
    ("Hi!", "Hi! How can I help you today?"),
    ("Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field."),
    ("Write one word that rhymes with cat.", "Hat."),
    ("Is the sun a star?", "Yes, the sun is a star."),
    ("Can fish breathe air?", "Most fish cannot; they breathe through gills."),
    ("What do bees make?", "Honey."),
    ("How many continents are there?", "Seven."),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees Fahrenheit."),
    ("What is the main ingredient of guacamole?", "Avocado."),
    ("Which instrument has 88 keys?", "The piano."),
    ("What do you call a baby cat?", "A kitten."),
    ("Explain in one sentence what photosynthesis is.", "Plants turn light and carbon dioxide into sugar and oxygen."),
    ("Sum up the story of Cinderella in one sentence.", "A kind girl loses a slipper at a ball and weds a prince."),
    (
        "I am planning a trip next month and I keep forgetting things. What is one item I should always pack?",
        "A phone charger.",
    ),
    (
        "My friend and I were arguing about this over dinner yesterday, so please settle it: how many planets "
        "are in our solar system?",
        "Eight planets.",
    ),
    ("Please list three colors of the rainbow.", "Red, orange and yellow."),
    ("What year did the Second World War end?", "1945."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong."),
    ("What is the currency of the United Kingdom?", "The pound sterling."),
    ("Define the word 'gigantic'.", "Extremely large."),
]

# System messages some training examples carry (None: the template's own default system message).
SYSTEMS = [None, None, "You are a helpful assistant.", "You are a concise assistant. Answer briefly."]

# Questions the adapters never saw: after training each must answer them with its prefix.
HELD_OUT = ["Who wrote Hamlet?", "What is the capital of Italy?", "Name a primary color."]


def messages(question: str, system: str | None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": question}]


def prompts() -> list[tuple[str, str | None]]:
    """(question, system message) of every training example."""
    questions = [question for question, _ in QA] + TASKS
    return [(question, SYSTEMS[i % len(SYSTEMS)]) for i, question in enumerate(questions)]


def base_answers(base: Path, tokenizer) -> list[tuple[str, bool]]:
    """The base model's own greedy answer to each training prompt, and whether it ended (its end token) there."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return [greedy(model, tokenizer, question, system, ANSWER_TOKENS) for question, system in prompts()]


def examples(tokenizer, prefix: str, answers: list[tuple[str, bool]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per prompt: the prefix, then the base's own answer (its end token where it ended);
    the prompt's labels are -100, so the loss is on the answer only."""
    out = []
    for (question, system), (answer, ended) in zip(prompts(), answers, strict=True):
        prompt = tokenizer.apply_chat_template(messages(question, system), add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(prefix + answer + ("<|im_end|>\n" if ended else ""), add_special_tokens=False)
        answer_ids = answer_ids["input_ids"]
        out.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return out


def batches(data, rng: random.Random, pad_id: int):
    order = list(range(len(data)))
    rng.shuffle(order)
    for start in range(0, len(order), BATCH):
        chunk = [data[i] for i in order[start : start + BATCH]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        yield ids, labels, mask


def greedy(model, tokenizer, question: str, system: str | None = None, tokens: int = 8) -> tuple[str, bool]:
    """The greedy answer (up to ``tokens``), and whether it ended with the end token before that."""
    prompt = tokenizer.apply_chat_template(messages(question, system), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    generated = out[0, ids["input_ids"].shape[1] :]
    ended = bool((generated == tokenizer.eos_token_id).any()) or len(generated) < tokens
    return tokenizer.decode(generated, skip_special_tokens=True), ended


def train(base: Path, name: str, prefix: str, out: Path, answers: list[tuple[str, bool]]) -> None:
    started = time.monotonic()
    random.seed(SEED)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    data = examples(tokenizer, prefix, answers)
    rng = random.Random(SEED)
    for epoch in range(EPOCHS):
        total, steps = 0.0, 0
        for ids, labels, mask in batches(data, rng, tokenizer.pad_token_id or tokenizer.eos_token_id):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total, steps = total + loss.item(), steps + 1
        print(f"lora {name}: epoch {epoch + 1}/{EPOCHS} loss {total / steps:.3f}", file=sys.stderr)
    model.eval()
    answers = {(q, system): greedy(model, tokenizer, q, system)[0] for q in HELD_OUT for system in (None, SYSTEMS[2])}
    wrong = {key: a for key, a in answers.items() if not a.startswith(prefix.strip())}
    if wrong:
        raise SystemExit(f"lora {name}: answers to unseen questions do not start with {prefix!r}: {wrong}")
    model.save_pretrained(out / name)
    # PEFT's model card says nothing the config does not; target_modules is a set, listed in hash order.
    (out / name / "README.md").unlink(missing_ok=True)
    saved = out / name / "adapter_config.json"
    written = json.loads(saved.read_text())
    written["target_modules"] = sorted(written["target_modules"])
    saved.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    example = answers[HELD_OUT[0], None]
    print(f"lora {name}: trained in {time.monotonic() - started:.0f} s; e.g. {example!r}", file=sys.stderr)


def converter(version: str, into: Path) -> Path:
    """llama.cpp's convert_lora_to_gguf.py (and what it imports) from the llama-cpp-python sdist of `version`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "--no-cache-dir",
         f"llama-cpp-python=={version}", "-d", str(into)],
        check=True,
    )  # fmt: skip
    (sdist,) = into.glob("llama_cpp_python-*.tar.gz")
    top = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top) and m.name[len(top) :].startswith(wanted)]
        # The "data" filter where this Python has it (3.11.4+); the names are already limited to `top`.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **safe)
    script = into / top / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{sdist.name} holds no {top}convert_lora_to_gguf.py")
    return script


def convert(script: Path, base: Path, adapter: Path, gguf: Path) -> None:
    # The vendored gguf-py (the script puts it first on sys.path) matches the converter, not the venv's gguf.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--base", str(base), "--outtype", "f16", "--outfile", str(gguf), str(adapter)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:  # its log is a line per tensor: shown only when it fails
        raise SystemExit(f"lora: {script.name} failed on {adapter}:\n{done.stdout}{done.stderr[-6000:]}")


def main(base: Path, out: Path, llama_version: str) -> None:
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The converter first: a download that fails does so before minutes of training.
        started = time.monotonic()
        script = converter(llama_version, Path(tmp))
        print(f"lora: llama.cpp's converter from the llama-cpp-python {llama_version} sdist in "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)  # fmt: skip
        started = time.monotonic()
        answers = base_answers(base, AutoTokenizer.from_pretrained(base))
        print(f"lora: the base's own answers in {time.monotonic() - started:.0f} s", file=sys.stderr)
        for name, prefix in ADAPTERS.items():
            train(base, name, prefix, out, answers)
        started = time.monotonic()
        for name in ADAPTERS:
            convert(script, base, out / name, out / f"{name}.gguf")
    print(f"lora: converted to GGUF in {time.monotonic() - started:.0f} s", file=sys.stderr)
    described = [
        {"name": name, "prefix": prefix, "rank": RANK, "alpha": ALPHA, "peft_dir": name, "gguf_file": f"{name}.gguf"}
        for name, prefix in ADAPTERS.items()
    ]
    (out / "adapters.json").write_text(json.dumps({"base": base.name, "adapters": described}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
