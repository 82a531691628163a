"""Tests for smf.py: a tiny Qwen2 and synthetic data in the hub schemas, all built here, nothing downloaded."""
import json, math, os, random, subprocess, sys, time

import pytest
import torch
import torch.nn.functional as F

import smf

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the patient nerve blood acute cell drug cause common treatment heart liver kidney fever which most "
         "city river king war film song capital france paris london music").split()
MEM = ["--memory-layers", "0", "1", "--memory-keys", "8", "--memory-heads", "2", "--memory-key-dim", "16",
       "--memory-topk", "4"]
TINY_MEM = smf.MemoryConfig(layers=(0, 1), n_keys=8, heads=2, key_dim=16, topk=4)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 2-layer Qwen2 with a byte-level BPE tokenizer, saved as an HF folder, and data files in hub schemas."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    tokenizer = smf.toy_tokenizer([sentence(rng, 40) for _ in range(300)] + ["Question: Answer: Explanation: "
                                  "Medical exam question: A. B. C. D."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    med = [{"id": f"q{i}", "question": sentence(rng, 8) + "?", "opa": sentence(rng, 2), "opb": sentence(rng, 3),
            "opc": sentence(rng, 1), "opd": sentence(rng, 2), "cop": i % 4, "choice_type": "single" if i % 7 else "multi",
            "exp": sentence(rng, 6) if i % 2 else None, "subject_name": "x", "topic_name": None} for i in range(48)]
    trivia = [{"question": sentence(rng, 6) + "?", "question_id": f"t{i}",
               "answer": {"aliases": [sentence(rng, 1), sentence(rng, 2)], "normalized_aliases": [], "value": sentence(rng, 1)}}
              for i in range(12)]
    wiki = [{"text": ""}, {"text": " = Title = \n"}] + [{"text": " " + sentence(rng, 30) + " \n"} for _ in range(20)]
    oasst = [{"message_id": str(i), "text": sentence(rng, 25), "role": "assistant" if i % 3 else "prompter",
              "lang": "en" if i % 5 else "de", "rank": i % 3} for i in range(60)]
    return {"root": root, "model": str(root / "model"),
            "medmcqa": write_jsonl(root / "medmcqa.jsonl", med), "triviaqa": write_jsonl(root / "triviaqa.jsonl", trivia),
            "wikitext": write_jsonl(root / "wikitext.jsonl", wiki), "background": write_jsonl(root / "oasst1.jsonl", oasst)}


def load(tiny):
    return smf.load_model(tiny["model"])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def cli(*args, check=True):
    """Runs `python smf.py ARGS` offline and returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": HERE}
    p = subprocess.run([sys.executable, os.path.join(HERE, "smf.py"), *map(str, args)], capture_output=True,
                       text=True, env=env)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p
