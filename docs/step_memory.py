"""One training step of smf.py on a model of Qwen2.5-0.5B's width and vocabulary (2 decoder layers, random
weights), in a fresh process on CPU in fp32. Prints: method B T seconds-of-the-step MB-the-step-added.
Usage: python docs/step_memory.py <method> <B> <T>   (from the folder that holds smf.py)"""
import os, resource, sys, time
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smf

method, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
model = Qwen2ForCausalLM(config)
memory, stats = smf.MemoryConfig(layers=(0, 1)), None
if method == "smf":                      # a retrofit's memory at both layers, flat background statistics
    smf.add_memory(model, memory)
    n = memory.n_keys ** 2
    stats = [smf.BackgroundStats(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), 1)] * 2
smf.prepare_model(model, method, memory, (16, 32.0, 0.05))
examples = [torch.randint(0, 151936, (T,)).tolist() for _ in range(B)]
cfg = smf.TrainConfig(method=method, max_steps=1, warmup=0, micro_batch=4, grad_accum=B // 4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
smf.train(model, examples, cfg, stats)
seconds = time.perf_counter() - t0
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss: KiB on Linux
print(method, B, T, f"{seconds:.2f}", f"{added:.0f}")
